"""Bad input to a command-line program is one `error:` line naming the problem, exit status 2, no traceback.

Each case runs the program's `main` in this process, before any slow work; the table grows with the programs."""

from pathlib import Path

import numpy as np
import pytest
from conftest import save_bert_tokenizer
from PIL import Image

from retrieval import build, evaluate, search
from stage1 import train as stage1
from stage2 import caption
from stage2 import train as stage2
from lavis_lite import cli

REPO = Path(__file__).resolve().parent.parent
TINY1 = str(REPO / "configs/stage1/tiny.yaml")
TINY2 = str(REPO / "configs/stage2/tiny.yaml")
TOK = ["--config", TINY1, "model.qformer.tokenizer={tok}", "model.qformer.vocab_size=9"]  # gets past the tokenizer


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
    save_bert_tokenizer(tmp / "tokenizer", ["a", "red", "circle"])
    out["tok"] = str(tmp / "tokenizer")
    (tmp / "a-file").write_text("not a directory\n")
    out["file"] = str(tmp / "a-file")
    (tmp / "empty").mkdir()
    out["empty"] = str(tmp / "empty")
    (tmp / "page.jpg").write_bytes(b"<!DOCTYPE html><html>404</html>")
    out["html_jpg"] = str(tmp / "page.jpg")
    return out


@pytest.fixture(scope="module")
def broken_indexes(tmp_path_factory) -> dict[str, str]:
    """A small finished index and copies of it with one file broken each."""
    import shutil

    from retrieval.index import IndexWriter

    root = tmp_path_factory.mktemp("indexes")
    vectors = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    writer = IndexWriter(root / "good", dim=8, vectors_per_item=1, index_type="flat")
    writer.write_chunk(0, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), [{"caption": f"c{i}"} for i in range(12)])
    writer.finalize()
    breaks = {
        "offsets_garbage": ("items.offsets.npy", b"\x00garbage"),
        "offsets_short": ("items.offsets.npy", None),
        "items_cut": ("items.jsonl", "cut"),
        "manifest_garbage": ("manifest.json", b"{not json"),
        "manifest_list": ("manifest.json", b"[1, 2]"),
        "manifest_fields": ("manifest.json", b'{"format_version": 1}'),
        "faiss_garbage": ("index.faiss", b"not a faiss index"),
        "items_line": ("items.jsonl", "line"),
    }
    out = {"good_index": str(root / "good")}
    for name, (file, content) in breaks.items():
        shutil.copytree(root / "good", root / name)
        path = root / name / file
        if content is None:
            np.save(path, np.load(path)[:5])
        elif content == "cut":
            path.write_bytes(path.read_bytes()[:-7])
        elif content == "line":
            lines = path.read_bytes().splitlines(keepends=True)
            lines[3] = b"\xff" * (len(lines[3]) - 1) + b"\n"  # same length, not JSON
            path.write_bytes(b"".join(lines))
        else:
            path.write_bytes(content)
        out[name] = str(root / name)
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
    (stage1, ["--config", TINY1, "train.optim.lr=abc"], "bad value for config key 'train.optim.lr'"),
    (stage1, ["--config", TINY1, "train.optim.lr_scale.qformer=x"], "bad value for config key 'train.optim.lr_scale.qformer'"),
    (stage1, ["--config", TINY1, "train.log_every=0"], "train.log_every=0: must be at least 1"),
    (stage1, ["--config", TINY1, "train.save_every=0"], "train.save_every=0: must be at least 1"),
    (stage1, ["--config", TINY1, "train.keep_checkpoints=0"], "train.keep_checkpoints=0: must be at least 1"),
    (stage1, ["--config", TINY1, "train"], "override 'train' is not of the form key=value"),
    (stage1, ["--config", "no-such-recipe"], "no recipe 'no-such-recipe': give a YAML path or one of"),
    (stage1, ["--config", TINY1, "--resume", "--overwrite"], "--overwrite: not allowed with argument --resume"),
    (stage1, ["--config", TINY1, "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (stage1, ["--config", TINY1, "model.vision.kind=bogus"], "unknown vision.kind 'bogus'"),
    (stage1, ["--config", TINY1, "model.losses=[itc,bogus]"], "unknown loss ['bogus']"),
    (stage1, ["--config", TINY1, "model.qformer.bert={empty}"], "{empty} holds no tokenizer"),
    (stage1, [*TOK, "train.output_dir={run}", "data.train_shards={missing}"], "no shards at '{missing}'"),
    (stage1, [*TOK, "train.output_dir={run}", "data.train_shards={empty}"], "no shards in '{empty}'"),
    (stage1, [*TOK, "train.output_dir={file}/run"], "train.output_dir {file}/run: {file} is a file, not a directory"),
    (stage1, [*TOK, "train.output_dir={file}"], "train.output_dir {file} is a file: give a directory path"),
    (stage1, [*TOK, "train.output_dir={run}", "model.vision.checkpoint={missing}"], "vision.checkpoint={missing} not found"),
    (stage1, [*TOK, "train.output_dir={run}", "model.vision.checkpoint={image}"], "vision.checkpoint={image} is not a readable weights file"),
    (stage1, [*TOK[:2], "model.qformer.tokenizer={tok}", "train.output_dir={run}"], "but the tokenizer has 9 tokens"),
    (stage2, ["--config", "{syntax}"], "is not valid YAML (line 3"),
    (stage2, ["--config", "{scalar}"], "is not a mapping"),
    (stage2, ["--config", TINY2, "train.stepz=1"], "unknown config key 'train.stepz'"),
    (stage2, ["--config", TINY2, "data.batch_size=0"], "data.batch_size=0: must be at least 1"),
    (stage2, ["--config", TINY2, "train.precision=fp64"], "train.precision='fp64'"),
    (stage2, ["--config", TINY2, "train.output_dir={run}", "--resume"], "holds no complete checkpoint"),
    (stage2, ["--config", TINY2, "train.output_dir={run}"], "llm.path is empty"),
    (stage2, ["--config", TINY2, "train.output_dir={run}", "model.llm.path={missing}"], "llm.path={missing} does not exist"),
    (stage2, ["--config", TINY2, "train.output_dir={run}", "model.llm.path={empty}"], "llm.path={empty} holds no config.json"),
    (stage2, ["--config", TINY2, "train.output_dir={run}", "model.llm.path={image}"], "llm.path={image} is a file but not a .gguf"),
    (caption, ["--checkpoint", "{missing}", "--num-beams", "0", "{image}"], "argument --num-beams: must be at least 1, got 0"),
    (caption, ["--checkpoint", "{missing}", "--max-new-tokens", "-1", "{image}"], "argument --max-new-tokens: must be at least 1"),
    (caption, ["--checkpoint", "{missing}", "--batch-size", "0", "{image}"], "argument --batch-size: must be at least 1"),
    (caption, ["{image}"], "the following arguments are required: --checkpoint"),
    (caption, ["--checkpoint", "{missing}", "{html_jpg}"], "cannot read image {html_jpg}"),
    (caption, ["--checkpoint", "{missing}", "{tmp}"], "cannot read image {tmp}"),
    (caption, ["--checkpoint", "{truncated}", "{image}"], "is not a stage-2 checkpoint"),
    (caption, ["--checkpoint", "{missing}", "--device", "tpu", "{image}"], "argument --device: invalid choice: 'tpu'"),
    (build, ["--config", "{missing}"], "no recipe '{missing}'"),
    (build, ["--config", "{syntax}"], "is not valid YAML"),
    (build, ["--config", "{list}"], "is a list"),
    (build, ["bogus_key=1"], "unknown config key 'bogus_key'"),
    (build, ["target=video"], "target='video': choose image"),
    (build, ["batch_size=0"], "batch_size=0: must be at least 1"),
    (build, ["chunk_size=-3"], "chunk_size=-3: must be at least 1"),
    (build, ["corpus.kind=bogus"], "corpus.kind='bogus'"),
    (build, ["precision=bogus"], "precision='bogus' is not one of"),
    (build, ["index_type=bogus"], "index_type='bogus'"),
    (build, ["index_options.bogus=1"], "unknown index_options ['bogus']"),
    (build, ["corpus.max_image_pixels=0"], "corpus.max_image_pixels=0: must be at least 1"),
    (build, ["checkpoint={missing}", "corpus.path={pairs}", "output_dir={run}"], "checkpoint {missing} does not exist"),
    (build, ["checkpoint={truncated}", "corpus.path={pairs}", "output_dir={run}"], "is not a readable weights file"),
    (build, ["checkpoint={truncated}", "corpus.path={pairs}", "output_dir={image}"], "output_dir {image} is a file"),
    (build, ["checkpoint={truncated}", "corpus.path={pairs}", "output_dir={file}/index"], "{file} is a file, not a directory"),
    (search, ["--index", "{empty}", "a red circle"], "{empty}/manifest.json is missing"),
    (search, ["--index", "{image}", "a red circle"], "no retrieval index there (not a directory)"),
    (search, ["--index", "{missing}", "-k", "0", "a red circle"], "argument -k/--top-k: must be at least 1, got 0"),
    (search, ["--index", "{missing}", "--rerank", "-1", "a red circle"], "argument --rerank: must be at least 0"),
    (search, ["--index", "{missing}", "--nprobe", "0", "a red circle"], "argument --nprobe: must be at least 1"),
    (search, ["a red circle"], "the following arguments are required: --index"),
    (search, ["--index", "{missing}", "--html", "{file}/x/hits.html", "a red circle"], "{file} is a file, not a directory"),
    (search, ["--index", "{offsets_garbage}", "a red circle"], "{offsets_garbage}/items.offsets.npy is not a readable offsets file"),
    (search, ["--index", "{offsets_short}", "a red circle"], "{offsets_short}/items.offsets.npy does not describe"),
    (search, ["--index", "{items_cut}", "a red circle"], "{items_cut}/items.offsets.npy does not describe"),
    (search, ["--index", "{manifest_garbage}", "a red circle"], "{manifest_garbage}/manifest.json"),
    (search, ["--index", "{manifest_list}", "a red circle"], "{manifest_list}/manifest.json is not a JSON object"),
    (search, ["--index", "{manifest_fields}", "a red circle"], "{manifest_fields}/manifest.json lacks valid fields"),
    (search, ["--index", "{faiss_garbage}", "a red circle"], "{faiss_garbage}/index.faiss is not a readable faiss index"),
    (evaluate, ["--checkpoint", "{missing}", "--corpus", "{pairs}", "--out", "{image}/m.json"], "{image} is a file, not a directory"),
    (evaluate, ["--checkpoint", "{missing}", "--corpus", "{pairs}", "--rerank-k", "-1"], "argument --rerank-k: must be at least 0"),
    (evaluate, ["--checkpoint", "{missing}", "--corpus", "{pairs}", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (evaluate, ["--checkpoint", "{missing}", "--corpus", "{syntax}", "--out", "{run}/m.json"], "corpus not found or not understood"),
    (evaluate, ["--checkpoint", "{missing}", "--corpus", "{pairs}", "--out", "{run}/m.json"], "checkpoint {missing} does not exist"),
    (cli, ["bogus"], "unknown command 'bogus'"),
    (cli, ["serve"], "no index to serve"),
    (cli, ["serve", "--index", "demo"], "is not NAME=DIR"),
    (cli, ["serve", "--index", "demo={missing}"], "index not found: {missing}"),
    (cli, ["serve", "--indices", "{missing}"], "--indices {missing} not found"),
    (cli, ["serve", "--indices", "{syntax}"], "is not valid JSON / YAML"),
    (cli, ["serve", "--indices", "{list}"], "must map each name to a directory"),
    (cli, ["serve", "--index", "demo={offsets_garbage}"], "items.offsets.npy is not a readable offsets file"),
    (cli, ["serve", "--index", "demo={good_index}"], "was not built by lavis-lite index"),
    (cli, ["serve", "--port", "0", "--index", "demo={good_index}"], "argument --port: must be at least 1"),
    (stage2, ["--config", TINY2, "model.llm.stop_text=:"], "the value is not valid YAML"),
    (cli, ["convert", "--from", "lavis", "--to", "hf", "{image}", "{run}"], "--from lavis needs --model"),
    (cli, ["convert", "--from", "hf", "--to", "hf", "{run}", "{run}"], "nothing to convert"),
    (cli, ["convert", "--from", "hf", "--to", "ours", "{empty}", "{run}"], "{empty}/config.json not found"),
    (cli, ["convert", "--from", "ours", "--to", "lavis", "{missing}", "{run}.pth"], "no checkpoint at {missing}"),
    (cli, ["convert", "--from", "bogus", "--to", "ours", "{missing}", "{run}"], "argument --from: invalid choice"),
]


@pytest.mark.parametrize("program, argv, says", CASES, ids=[f"{p.__name__.split('.')[-1]}-{i}" for i, (p, _, _) in enumerate(CASES)])
def test_bad_input_is_one_error_line(program, argv, says, tmp_path, capsys, broken_indexes):
    paths = {**files(tmp_path), **broken_indexes}
    argv = [a.format(**paths) for a in argv]
    try:
        status = program.main(argv)
    except SystemExit as exit:  # argparse's usage errors
        status = exit.code
    assert status == 2
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


def _api_calls(paths: dict[str, str]) -> list:
    """(Python API call, what its UserError must say): the entry points a library user calls."""
    from lavis_lite import create_model, load_model_and_preprocess
    from lavis_lite.checkpoint import load_training_state, read_state_dict
    from lavis_lite.config import ModelConfig, merge_config
    from lavis_lite.models.tokenizer import build_tokenizer
    from retrieval.corpus import Corpus
    from retrieval.index import RetrievalIndex

    return [
        (lambda: create_model("no-such-model"), "no model config 'no-such-model'"),
        (lambda: create_model("tiny", ["qformer.bogus=1"]), "unknown config key 'qformer.bogus'"),
        (lambda: load_model_and_preprocess(paths["missing"]), f"checkpoint {paths['missing']} does not exist"),
        (lambda: load_model_and_preprocess(paths["truncated"]), "is not a readable weights file"),
        (lambda: read_state_dict(paths["image"]), "is not a readable weights file"),
        (lambda: read_state_dict(paths["missing"]), "not found: give a local weights file"),
        (lambda: load_training_state(Path(paths["truncated"])), "is not a training state lavis_lite wrote"),
        (lambda: merge_config(ModelConfig, [paths["list"]]), "is a list"),
        (lambda: build_tokenizer(paths["empty"]), "holds no tokenizer"),
        (lambda: Corpus(paths["missing"]), "corpus not found or not understood"),
        (lambda: Corpus(paths["pairs"], kind="bogus"), "unknown corpus kind 'bogus'"),
        (lambda: RetrievalIndex.load(paths["offsets_garbage"]), "items.offsets.npy is not a readable offsets file"),
        (lambda: RetrievalIndex.load(paths["items_line"]).items([3]), "items.jsonl: item 3 is not a JSON line"),
        (lambda: RetrievalIndex.load(paths["good_index"]).items([12]), None),  # an IndexError: a caller's bug, not input
    ]


def test_python_api_entry_points_raise_user_errors_naming_the_problem(tmp_path, broken_indexes):
    from lavis_lite.errors import UserError

    paths = {**files(tmp_path), **broken_indexes}
    calls = _api_calls(paths)
    for call, says in calls:
        if says is None:
            with pytest.raises(IndexError):
                call()
            continue
        with pytest.raises(UserError) as caught:
            call()
        assert says in str(caught.value) and "\n" not in str(caught.value), (says, str(caught.value))
    assert len(CASES) + len(API_CASES) + len(calls) >= 80
