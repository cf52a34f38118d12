"""Bad input to a command-line program is one `error:` line naming the problem, exit status 2, no traceback.

Each case runs the program's `main` in this process, before any slow work; the table grows with the programs."""

from pathlib import Path

import pytest
from PIL import Image

from retrieval import build, evaluate, search
from stage1 import train as stage1
from stage2 import caption
from stage2 import train as stage2

REPO = Path(__file__).resolve().parent.parent
TINY1 = str(REPO / "configs/stage1/tiny.yaml")
TINY2 = str(REPO / "configs/stage2/tiny.yaml")


def files(tmp: Path) -> dict[str, str]:
    """Bad config files and paths, written into `tmp`."""
    made = {
        "syntax": "train:\n  steps: [1, 2\n",
        "list": "- train\n- steps\n",
        "scalar": "42\n",
        "binary": b"\x89PNG\r\n\x1a\n\x00\xff\xfe",
    }
    out = {}
    for name, content in made.items():
        path = tmp / f"{name}.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        out[name] = str(path)
    out["tmp"] = str(tmp)
    out["run"] = str(tmp / "run")
    out["missing"] = str(tmp / "no-such-thing")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp / "red.png")
    out["image"] = str(tmp / "red.png")
    (tmp / "pairs.jsonl").write_text('{"image_path": "red.png", "caption": "a red square"}\n')
    out["pairs"] = str(tmp / "pairs.jsonl")
    # A stage-1 checkpoint of the tiny model whose weights file was cut short.
    trunc = tmp / "truncated" / "checkpoints" / "step-00000001"
    trunc.mkdir(parents=True)
    model = (REPO / "configs/model/tiny.yaml").read_text()
    (trunc / "config.yaml").write_text("model:\n" + "".join(f"  {line}\n" for line in model.splitlines()))
    (trunc / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": {")
    (trunc / "training_state.pt").write_bytes(b"")
    out["truncated"] = str(trunc)
    return out


CASES = [
    # (program, arguments with {placeholders} from `files`, what the line must say)
    (stage1, ["--config", "{missing}"], "no recipe"),
    (stage1, ["--config", "{syntax}"], "is not valid YAML (line 3"),
    (stage1, ["--config", "{list}"], "is a list: a config file maps keys to values"),
    (stage1, ["--config", "{scalar}"], "is not a mapping"),
    (stage1, ["--config", "{binary}"], "is not valid YAML"),
    (stage1, ["--config", TINY1, "train.stepz=5"], "unknown config key 'train.stepz'"),
    (stage1, ["--config", TINY1, "train.steps=-5"], "train.steps=-5: must be at least 1"),
    (stage1, ["--config", TINY1, "train.steps=many"], "bad value for config key 'train.steps'"),
    (stage1, ["--config", TINY1, "data.batch_size=0"], "data.batch_size=0: must be at least 1"),
    (stage1, ["--config", TINY1, "data.num_workers=-1"], "data.num_workers=-1: must be at least 0"),
    (stage1, ["--config", TINY1, "train.precision=bogus"], "train.precision='bogus'"),
    (stage1, ["--config", TINY1, "train.grad_accum=0"], "train.grad_accum=0: must be at least 1"),
    (stage1, ["--config", TINY1, "data.max_image_pixels=0"], "data.max_image_pixels=0: must be at least 1"),
    (stage1, ["--config", TINY1, "train.output_dir={run}", "--resume"], "holds no complete checkpoint"),
    (stage1, ["--config", TINY1, "--resume", "train.output_dir={run}"], "holds no complete checkpoint"),
    (stage1, ["--config", TINY1, "train.output_dir={run}"], "stage 1 needs a tokenizer"),
    (stage1, ["--config", TINY1, "train.output_dir={run}", "model.qformer.bert={missing}"], "tokenizer directory not found"),
    (stage2, ["--config", "{list}"], "is a list"),
    (stage2, ["--config", TINY2, "train.steps=0"], "train.steps=0: must be at least 1"),
    (stage2, ["--config", TINY2, "train.output_dir={run}", "model.stage1_checkpoint={missing}"], "does not exist: train stage 1 first"),
    (caption, ["--checkpoint", "{missing}", "{missing}"], "image not found"),
    (caption, ["--checkpoint", "{missing}", "{image}"], "cannot load --checkpoint {missing}: no checkpoint at"),
    (build, ["--config", "{scalar}"], "is not a mapping"),
    (build, ["checkpoint={missing}", "corpus.path={missing}", "output_dir={run}"], "not found"),
    (search, ["--index", "{missing}", "a red circle"], "index not found"),
    (search, ["--index", "{missing}", "--html", "{tmp}", "a red circle"], "--html {tmp} is a directory"),
    (search, ["--index", "{missing}", "--html", "{image}/hits.html", "a red circle"], "{image} is a file, not a directory"),
    (evaluate, ["--checkpoint", "{missing}", "--corpus", "{missing}", "--out", "{run}/m.json"], "{missing}"),
    (evaluate, ["--checkpoint", "{missing}", "--corpus", "{pairs}", "--out", "{tmp}"], "--out {tmp} is a directory"),
    (evaluate, ["--checkpoint", "{truncated}", "--out", "{run}/m.json"], "records no held-out shards"),
    (evaluate, ["--checkpoint", "tiny", "--out", "{run}/m.json"], "is not a run directory: give --corpus"),
    (evaluate, ["--checkpoint", "{truncated}", "--corpus", "{pairs}", "--out", "{run}/m.json"], "is not a readable weights file"),
]


@pytest.mark.parametrize("program, argv, says", CASES, ids=[f"{p.__name__.split('.')[-1]}-{i}" for i, (p, _, _) in enumerate(CASES)])
def test_bad_input_is_one_error_line(program, argv, says, tmp_path, capsys):
    paths = files(tmp_path)
    argv = [a.format(**paths) for a in argv]
    assert program.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert says.format(**paths) in lines[0], lines[0]


API_CASES = [
    # (what the file holds, what the error must say) for a Karpathy-split JSON
    ("{not json", "is not a JSON file"),
    ('{"images": []}', "holds a JSON dict, not the list"),
    ('[{"image": "a.jpg", "caption": "a cat"}, ["a.jpg", "a dog"]]', "entry 1 is not"),
    ('[{"image": 7, "caption": "a cat"}]', "entry 0 is not"),
    ('[{"image": "a.jpg"}]', "entry 0 is not"),
]


@pytest.mark.parametrize("content, says", API_CASES)
def test_bad_karpathy_json_is_a_user_error_naming_the_file(content, says, tmp_path):
    from lavis_lite.data.annotations import read_karpathy
    from lavis_lite.errors import UserError

    path = tmp_path / "test.json"
    path.write_text(content)
    with pytest.raises(UserError, match=says) as caught:
        read_karpathy(path, tmp_path)
    assert str(path) in str(caught.value)


def test_missing_shards_are_named(tmp_path):
    from lavis_lite.data.webdataset_pipeline import list_shards
    from lavis_lite.errors import UserError

    for shards in (tmp_path / "nowhere", str(tmp_path / "shard-{000..003}.tar")):
        with pytest.raises(UserError, match="no shards"):
            list_shards(str(shards))
