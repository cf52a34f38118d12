"""The package works outside the repository: a wheel installed (not editable) into a fresh directory builds the
packaged models, lists them, and runs the `lavis-lite` command, from a directory that is not the checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "lavis_lite", "stage1", "stage2", "retrieval", "configs"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel of a copy of the sources, installed with `pip --target` (no deps: they are this venv's)."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)], check=True)
    (wheel,) = (root / "dist").glob("lavis_lite-*.whl")
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True)
    return site


def run_outside(site: Path, tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_holds_one_top_level_package(installed):
    top = {p.name for p in installed.iterdir() if not p.name.endswith((".dist-info", "bin"))}
    assert top == {"lavis_lite"}, top  # no generic `retrieval`, `stage1`, `configs` beside it
    assert (installed / "lavis_lite" / "configs" / "model" / "tiny.yaml").is_file()
    assert (installed / "lavis_lite" / "retrieval" / "search.py").is_file()


def test_create_model_and_list_models_from_any_directory(installed, tmp_path):
    code = (
        "import lavis_lite, torch; from pathlib import Path\n"
        f"assert Path(lavis_lite.__file__).is_relative_to({str(installed)!r}), lavis_lite.__file__\n"
        "names = lavis_lite.list_models(); assert {'tiny', 'blip2-stage1-vitg'} <= set(names), names\n"
        "model, tok = lavis_lite.create_model('tiny')\n"
        "out = model.image_features(model.encode_image(torch.zeros(1, 3, 32, 32)))\n"
        "print(names, out[1].shape)\n"
    )
    done = run_outside(installed, tmp_path, sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 8, 16])" in done.stdout


def test_lavis_lite_command_and_its_subcommands(installed, tmp_path):
    script = installed / "bin" / "lavis-lite"
    done = run_outside(installed, tmp_path, str(script), "--help")
    assert done.returncode == 0, done.stderr
    for command in ("train-stage1", "train-stage2", "caption", "index", "search", "evaluate"):
        assert command in done.stdout
        sub = run_outside(installed, tmp_path, str(script), command, "--help")
        assert sub.returncode == 0, (command, sub.stderr)
        assert sub.stdout.startswith(f"usage: lavis-lite {command}"), sub.stdout[:200]
    wrong = run_outside(installed, tmp_path, str(script), "trian-stage1")
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: unknown command 'trian-stage1'")


def test_packaged_recipe_resolves_by_name_outside_the_repo(installed, tmp_path):
    """The default recipe is found in the package; its data paths are the working directory's, and missing
    data is one `error:` line naming the path, exit 2."""
    script = installed / "bin" / "lavis-lite"
    done = run_outside(installed, tmp_path, str(script), "train-stage1", "train.steps=1")
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in done.stderr, done.stderr[-2000:]
