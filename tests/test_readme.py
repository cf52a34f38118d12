"""Every command in the README is exercised: the Python quick start runs as written; each `lavis-lite` line
parses with its program's real parser and recipe (keys and all), and names the test that runs that program end
to end; each `make` line is a target that `make -n` accepts with those variables."""

import importlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from lavis_lite.cli import COMMANDS
from stage1.config import load_stage1_config
from stage2.config import load_stage2_config
from retrieval.config import load_build_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

# The tests that run each program for real (the README's lines need trained runs, so they are parsed here).
RUN_BY = {
    "train-stage1": "test_stage1_train.test_run_writes_metrics_and_curve",
    "train-stage2": "test_stage2_train.test_llama_run_writes_metrics_trainable_checkpoints_and_curve",
    "caption": "test_caption_cli.test_cli_captions_each_image_as_generate_does",
    "index": "test_retrieval_cli.test_build_writes_manifest_and_items",
    "search": "test_retrieval_cli.test_text_search_finds_what_brute_force_finds",
    "evaluate": "test_retrieval_cli.test_evaluate_writes_recall_json",
    "convert": "test_convert_cli.test_hf_to_lavis_to_ours_to_hf_is_the_identity",
    "serve": "test_serve.test_clip_client_gets_what_search_gives",
    "embed": "test_embed.test_two_processes_embed_what_one_does_and_the_index_answers_as_the_corpus_one",
}
RECIPES = {"train-stage1": load_stage1_config, "train-stage2": load_stage2_config, "index": load_build_config}
# What `make` lines may run (`make test` is this suite; `make demo` and `make ablation` are the long jobs).
MAKE_TARGETS = {"install", "test", "demo", "stage1", "stage2", "index", "search", "serve", "ablation"}


def shell_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            lines += [part.strip() for part in line.split("&&") if part.strip()]
    return lines


def test_readme_python_example_runs():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "create_model(" in b]
    assert len(blocks) == 1, "the README has one model-building Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["itc"].shape == (2, 2) and namespace["itm"].shape == (2, 2)


def test_every_shell_line_is_a_known_kind():
    lines = shell_lines()
    assert len(lines) >= 15
    unknown = [l for l in lines if not l.startswith(("lavis-lite ", "make ", "curl ", "source .venv/bin/activate"))]
    assert not unknown, f"README shell lines this test does not exercise: {unknown}"


@pytest.mark.parametrize("line", [l for l in shell_lines() if l.startswith("lavis-lite ")])
def test_lavis_lite_line_parses_and_names_its_test(line):
    command, *argv = shlex.split(line)[1:]
    assert command in COMMANDS, f"{line}: no subcommand {command}"
    module = importlib.import_module(f"lavis_lite.{COMMANDS[command][0]}")
    args = module.build_parser().parse_args(argv)
    if command in RECIPES:  # the recipe resolves and every override names a real key
        RECIPES[command](args.config, args.overrides)
    test_module, test_name = RUN_BY[command].split(".")
    assert callable(getattr(importlib.import_module(test_module), test_name))


@pytest.mark.parametrize("line", [l for l in shell_lines() if l.startswith("make ")])
def test_make_line_is_a_target_make_accepts(line):
    words = shlex.split(line)[1:]
    targets = [w for w in words if "=" not in w]
    assert targets and set(targets) <= MAKE_TARGETS, line
    for config in re.findall(r"CONFIG=(\S+)", line):
        assert (REPO / config).is_file(), f"{line}: {config} does not exist"
    done = subprocess.run(["make", "-n", *words], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    if "NPROC=16" in words:
        assert "accelerate launch --num_processes 16" in done.stdout


@pytest.mark.parametrize("line", [l for l in shell_lines() if l.startswith("curl ")])
def test_curl_line_is_a_request_the_service_accepts(line):
    """Each curl line posts to one of the service's routes a body its request model accepts (test_serve sends such
    requests to a running service)."""
    from retrieval.service import KnnRequest, MetadataRequest

    words = shlex.split(line)
    url, body = next(w for w in words[1:] if not w.startswith("-") and "/" in w), words[words.index("-d") + 1]
    route = "/" + url.split("/", 1)[1]
    schema = {"/knn-service": KnnRequest, "/metadata": MetadataRequest}[route]
    schema.model_validate(json.loads(body))
