"""Retrieval end to end on a tiny stage-1 checkpoint: corpus readers, `retrieval.build` (and its resume),
`retrieval.search` (results, re-ranking, JSON, every bad input, the HTML gallery in headless Chromium) and
`retrieval.evaluate`.

The checkpoint's vision encoder is a tiny timm CNN loaded from a weights file and its tokenizer a small
vocabulary, so every load rebuilds exactly the same model; its trainable weights are random, so the expected
hits are computed here by brute force from the same model (`load_model_and_preprocess`).
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lavis_lite.checkpoint import save_checkpoint
from lavis_lite.config import VisionConfig
from lavis_lite.data import SkipCounter
from lavis_lite.demo.synthetic import COLOURS, SHAPES, generate
from lavis_lite.inference.features import load_model_and_preprocess
from lavis_lite.models.factory import create_model
from lavis_lite.models.vision import build_vision_encoder
from retrieval import build, evaluate, search
from retrieval.corpus import Corpus, open_item_image
from retrieval.index import IndexWriter, RetrievalIndex
from stage1.config import Stage1Config
from conftest import save_bert_tokenizer

ROOT = Path(__file__).resolve().parent.parent
VISION = dict(kind="timm", name="test_efficientnet", image_size=32)
WORDS = [*dict.fromkeys(["a", "an", "and", "the", "on", "of", "in", "to", "left", "right", "above", "below", "top", "bottom",
         "corner", "center", "small", "large", "there", "is", "image", "picture", "with", *COLOURS, *SHAPES])]
IMAGES = 24


def save_tiny_checkpoint(root: Path, run: str, seed: int, *overrides: str) -> Path:
    """A stage-1 run directory of the tiny model with random trainable weights drawn from `seed`."""
    model, _ = create_model("tiny", [*(f"vision.{k}={v}" for k, v in VISION.items()),
                                     f"vision.checkpoint={root / 'vision.safetensors'}",
                                     f"qformer.tokenizer={root / 'tokenizer'}", f"qformer.vocab_size={len(WORDS) + 6}",
                                     "qformer.dropout=0", "qformer.attention_dropout=0", *overrides])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    save_checkpoint(root / run, 1, model, {}, Stage1Config(model=model.cfg))
    return root / run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (with two, each small op waits for the other on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shards of 24 captioned images (2 shards), a tokenizer, the vision weights and three checkpoints: the
    model, another draw of it and one with a different embedding width."""
    root = tmp_path_factory.mktemp("retrieval")
    generate(root / "data", train=0, val=IMAGES, image_size=32, seed=0, shard_size=12, progress=False)
    save_bert_tokenizer(root / "tokenizer", WORDS)
    torch.manual_seed(0)
    trunk = build_vision_encoder(VisionConfig(**VISION)).trunk
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(root / "vision.safetensors"))
    runs = {
        "model": save_tiny_checkpoint(root, "run", 0),
        "other": save_tiny_checkpoint(root, "other", 1),
        "narrow": save_tiny_checkpoint(root, "narrow", 0, "embed_dim=8"),
    }
    return root, runs


def build_args(assets, out: Path, *extra: str) -> list[str]:
    root, runs = assets
    return ["--config", str(ROOT / "configs/retrieval/demo.yaml"), f"checkpoint={runs['model']}",
            f"corpus.path={root / 'data/val'}", f"output_dir={out}", "batch_size=5", "chunk_size=10",
            "num_workers=2", "device=cpu", "precision=fp32", *extra]


@pytest.fixture(scope="module")
def indexes(assets, tmp_path_factory):
    """An image index and a text index of the shards, built by the CLI."""
    out = tmp_path_factory.mktemp("indexes")
    assert build.main(build_args(assets, out / "images")) == 0
    assert build.main(build_args(assets, out / "texts", "target=text")) == 0
    return out / "images", out / "texts"


@pytest.fixture(scope="module")
def reference(assets):
    """The model in this process and every corpus image's pixels, captions and key, in corpus order."""
    root, runs = assets
    model, vis, txt = load_model_and_preprocess(str(runs["model"]), dtype=torch.float32)
    items = list(Corpus(str(root / "data/val")).items(SkipCounter()))
    pixels = torch.stack([vis["eval"](item.image) for item in items])
    return model, txt["eval"], pixels, [item.captions[0] for item in items], [item.key for item in items]


def run_search(capsys, *args: str) -> dict:
    assert search.main([*args, "--precision", "fp32", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_build_writes_manifest_and_items(assets, indexes):
    _, runs = assets
    images, texts = RetrievalIndex.load(indexes[0]), RetrievalIndex.load(indexes[1])
    assert len(images) == IMAGES and len(texts) == IMAGES  # one caption per synthetic image
    manifest = images.manifest
    assert manifest["target"] == "image" and texts.manifest["target"] == "text"
    assert manifest["source"] == str(runs["model"]) and manifest["embed_dim"] == 16 and manifest["image_size"] == 32
    assert manifest["checkpoint_id"] == texts.manifest["checkpoint_id"] and len(manifest["checkpoint_id"]) == 16
    assert manifest["corpus"]["kind"] == "shards" and manifest["vectors_per_item"] == 8  # tiny model: 8 queries
    item = images.items([3])[0]
    assert item["key"] == "val_0000003" and item["captions"] and set(item["locator"]) == {"shard", "offset", "size"}
    assert set(texts.items([3])[0]) == {"caption", "key", "locator"}


def test_text_search_finds_what_brute_force_finds(reference, indexes, capsys):
    model, clean, pixels, captions, keys = reference
    query = captions[5]
    scores = model.itc_scores(pixels, [clean(query)])[:, 0]
    expected = scores.argsort(descending=True)[:4].tolist()
    document = run_search(capsys, "--index", str(indexes[0]), "-k", "4", query)
    hits = document["results"][0]["hits"]
    assert [h["key"] for h in hits] == [keys[i] for i in expected]
    assert [h["score"] for h in hits] == pytest.approx(scores[expected].tolist(), abs=1e-4)


def test_rerank_scores_itm_plus_itc(reference, indexes, capsys):
    model, clean, pixels, captions, keys = reference
    query = captions[2]
    hits = run_search(capsys, "--index", str(indexes[0]), "-k", "3", "--rerank", "6", query)["results"][0]["hits"]
    for hit in hits:
        image = pixels[keys.index(hit["key"])][None]
        assert hit["itm"] == pytest.approx(model.itm_scores(image, [clean(query)]).item(), abs=1e-4)
        assert hit["score"] == pytest.approx(hit["itm"] + hit["itc"], abs=1e-6)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    itc_order = run_search(capsys, "--index", str(indexes[0]), "-k", "6", query)["results"][0]["hits"]
    top = {h["key"]: h["itc"] + model.itm_scores(pixels[keys.index(h["key"])][None], [clean(query)]).item() for h in itc_order}
    assert [h["key"] for h in hits] == sorted(top, key=top.get, reverse=True)[:3]


def test_json_schema_and_several_queries(indexes, capsys):
    document = run_search(capsys, "--index", str(indexes[0]), "-k", "2", "a red circle", "a small blue square")
    assert set(document) == {"index", "target", "checkpoint_id", "top_k", "rerank", "results"}
    assert document["target"] == "image" and document["top_k"] == 2 and document["rerank"] == 0
    assert [r["query"] for r in document["results"]] == ["a red circle", "a small blue square"]
    hit = document["results"][0]["hits"][0]
    assert set(hit) == {"rank", "item_id", "score", "itc", "itm", "key", "locator", "captions"}
    assert hit["rank"] == 1 and hit["itm"] is None
    assert search.main(["--index", str(indexes[0]), "-k", "2", "a red circle"]) == 0  # the table
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "query: a red circle" and table[2].split()[0] == "1" and len(table) == 4


def test_image_query_searches_captions(reference, indexes, tmp_path, capsys):
    model, _, pixels, captions, _ = reference
    query = tmp_path / "query.png"
    open_item_image(RetrievalIndex.load(indexes[0]).items([7])[0]["locator"]).save(query)
    scores = model.itc_scores(pixels[7:8], captions)[0]
    order = scores.argsort(descending=True).tolist()
    plain = run_search(capsys, "--index", str(indexes[1]), "--image", str(query), "-k", "3")["results"][0]
    assert plain["query"] == str(query) and [h["caption"] for h in plain["hits"]] == [captions[i] for i in order[:3]]
    hits = run_search(capsys, "--index", str(indexes[1]), "--image", str(query), "-k", "3", "--rerank", "4")["results"][0]["hits"]
    final = {captions[i]: scores[i].item() + model.itm_scores(pixels[7:8], [captions[i]]).item() for i in order[:4]}
    assert [h["caption"] for h in hits] == sorted(final, key=final.get, reverse=True)[:3]
    assert [h["score"] for h in hits] == pytest.approx([final[h["caption"]] for h in hits], abs=1e-4)


def errors(capsys, *args: str) -> str:
    assert search.main(list(args)) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and out.err.count("\n") == 1  # one line, no traceback
    return out.err


def test_bad_inputs_are_named(assets, indexes, tmp_path, capsys):
    _, runs = assets
    images, texts = (str(p) for p in indexes)
    nowhere = tmp_path / "nowhere"
    assert f"index not found: {nowhere}" in errors(capsys, "--index", str(nowhere), "a red circle")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not an index")
    assert "is not a usable retrieval index" in errors(capsys, "--index", str(tmp_path / "plain"), "a red circle")
    assert "dimension mismatch: " in errors(capsys, "--index", images, "--checkpoint", str(runs["narrow"]), "a red circle")
    mismatch = errors(capsys, "--index", images, "--checkpoint", str(runs["other"]), "a red circle")
    assert "checkpoint mismatch: " in mismatch and "omit --checkpoint" in mismatch
    assert "empty query" in errors(capsys, "--index", images, "a red circle", "")
    assert "empty query" in errors(capsys, "--index", images, "   ")
    assert "empty query" in errors(capsys, "--index", images, "...")
    assert "no query given" in errors(capsys, "--index", images)
    query = tmp_path / "query.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(query)
    assert "--image searches a text index" in errors(capsys, "--index", images, "--image", str(query))
    assert "text queries search an image index" in errors(capsys, "--index", texts, "a red circle")
    assert f"image not found: {tmp_path / 'gone.png'}" in errors(capsys, "--index", texts, "--image", str(tmp_path / "gone.png"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(query.read_bytes()[:40])
    assert f"cannot read image {corrupt}" in errors(capsys, "--index", texts, "--image", str(corrupt))
    assert "cannot load --checkpoint" in errors(capsys, "--index", images, "--checkpoint", str(nowhere), "a red circle")
    stale = tmp_path / "stale"  # the index's own checkpoint was retrained after the build
    shutil.copytree(images, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    (stale / "manifest.json").write_text(json.dumps({**manifest, "checkpoint_id": "0" * 16}))
    assert "changed since" in errors(capsys, "--index", str(stale), "a red circle")


def test_build_errors_name_the_setting(assets, tmp_path, capsys):
    assert build.main(build_args(assets, tmp_path / "x", "corpus.pth=y")) == 2
    assert "unknown config key 'corpus.pth'" in capsys.readouterr().err
    assert build.main(build_args(assets, tmp_path / "x", f"corpus.path={tmp_path / 'none'}")) == 2
    assert f"corpus not found or not understood: {tmp_path / 'none'}" in capsys.readouterr().err
    assert build.main(build_args(assets, tmp_path / "x", "target=both")) == 2
    assert "target='both': choose image" in capsys.readouterr().err


def test_cli_process_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "retrieval.search", "--index", str(tmp_path / "nowhere"), "a red circle"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: index not found") and "Traceback" not in done.stderr


def test_interrupted_build_resumes(assets, indexes, tmp_path, monkeypatch):
    """Killed after its first chunk, the same command continues with the second, and the index is the same."""
    write_chunk = IndexWriter.write_chunk
    written = []

    def failing(self, chunk_id, vectors, items):
        if written:
            raise KeyboardInterrupt  # killed while embedding the second chunk
        written.append(chunk_id)
        write_chunk(self, chunk_id, vectors, items)

    monkeypatch.setattr(IndexWriter, "write_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        build.main(build_args(assets, tmp_path / "index"))
    assert written == [0] and not (tmp_path / "index").exists()

    def counting(self, chunk_id, vectors, items):
        written.append(chunk_id)
        write_chunk(self, chunk_id, vectors, items)

    monkeypatch.setattr(IndexWriter, "write_chunk", counting)
    assert build.main(build_args(assets, tmp_path / "index")) == 0
    assert written == [0, 1, 2]  # only the chunks the first run did not finish
    resumed, whole = RetrievalIndex.load(tmp_path / "index"), RetrievalIndex.load(indexes[0])
    assert resumed.items(range(IMAGES)) == whole.items(range(IMAGES))
    query = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    assert resumed.search(query, 5) == whole.search(query, 5)


def test_a_build_does_not_resume_onto_a_changed_corpus(assets, tmp_path, monkeypatch, capsys):
    """An interrupted build's chunks were embedded from the corpus as it was: after a shard is added, the same
    command stops with an error naming the change; `resume=false` builds afresh from the corpus as it is."""
    root, _ = assets
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "data/val", corpus)
    args = [*build_args(assets, tmp_path / "index"), f"corpus.path={corpus}"]

    def killed(self, chunk_id, vectors, items):
        raise KeyboardInterrupt

    write_chunk = IndexWriter.write_chunk
    monkeypatch.setattr(IndexWriter, "write_chunk", lambda self, *a: (write_chunk(self, *a), killed(self, *a)))
    with pytest.raises(KeyboardInterrupt):
        build.main(args)
    monkeypatch.setattr(IndexWriter, "write_chunk", write_chunk)
    shards = sorted(corpus.glob("*.tar"))
    shutil.copy(shards[0], corpus / "extra-000000.tar")
    capsys.readouterr()
    assert build.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "manifest.corpus.fingerprint" in err and "resume=False" in err, err
    assert build.main([*args, "resume=false"]) == 0
    assert RetrievalIndex.load(tmp_path / "index").manifest["count"] == IMAGES + len(list(Corpus(str(shards[0])).entries(SkipCounter())))


def test_corpus_readers_skip_and_count(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (0, 0, 255)).save(folder / "sub" / "b.png")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "a.jpg")
    (folder / "a.txt").write_text("A Red Box.")
    (folder / "sub" / "b.txt").write_text(" ... ")  # cleans to nothing
    (folder / "c.png").write_bytes(b"\x89PNG not really")
    skipped = SkipCounter()
    items = list(Corpus(str(folder)).items(skipped))
    assert [(i.key, i.captions) for i in items] == [("a.jpg", ["a red box"]), ("sub/b.png", [])]
    assert skipped.as_dict() == {"corrupt_image": 1, "empty_caption": 1}
    texts = SkipCounter()
    assert [e.key for e in Corpus(str(folder), require_captions=True).entries(texts)] == ["a.jpg"]
    assert texts.as_dict() == {"empty_caption": 1, "missing_caption": 1}

    karpathy = tmp_path / "test.json"
    karpathy.write_text(json.dumps([{"image": "a.jpg", "caption": ["one", "two"]}, {"image": "gone.jpg", "caption": ["x"]}]))
    skipped = SkipCounter()
    corpus = Corpus(str(karpathy), image_root=str(folder))
    assert corpus.kind == "karpathy"
    assert [(i.key, i.captions) for i in corpus.items(skipped)] == [("a.jpg", ["one", "two"])]
    assert skipped.as_dict() == {"missing_image": 1}
    table = tmp_path / "pairs.csv"
    table.write_text("image_path,caption\nphotos/a.jpg,first\nphotos/sub/b.png,second\nphotos/a.jpg,third\n")
    assert [(e.key, e.captions) for e in Corpus(str(table)).entries(SkipCounter())] == [
        ("photos/a.jpg", ["first", "third"]), ("photos/sub/b.png", ["second"])]

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("k1.png", (folder / "sub" / "b.png").read_bytes()), ("k1.txt", b"blue"),
                           ("k2.jpg", b"broken"), ("k2.txt", b"bad image"), ("k3.txt", b"no image")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    skipped = SkipCounter()
    items = list(Corpus(str(shard)).items(skipped))
    assert [(i.key, i.captions) for i in items] == [("k1", ["blue"])]
    assert skipped.as_dict() == {"corrupt_image": 1, "missing_image": 1}
    assert np.array_equal(np.asarray(open_item_image(items[0].locator)), np.asarray(Image.open(folder / "sub" / "b.png")))


def test_evaluate_writes_recall_json(assets, tmp_path, capsys):
    root, runs = assets
    out = tmp_path / "metrics.json"
    args = ["--checkpoint", str(runs["model"]), "--corpus", str(root / "data/val"), "--rerank-k", "3",
            "--out", str(out), "--batch-size", "10", "--device", "cpu"]
    assert evaluate.main(args) == 0
    report = json.loads(out.read_text())
    assert report["images"] == IMAGES and report["texts"] == IMAGES and report["rerank_k"] == 3
    for prefix in ("", "itm_"):
        for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
            assert 0.0 <= report["metrics"][prefix + key] <= 1.0
    assert report["metrics"]["chance_r1"] == pytest.approx(1 / IMAGES)
    table = capsys.readouterr().out
    assert "text -> image (ITC + ITM, top 3)" in table and "image -> text (ITC)" in table

    annotations = tmp_path / "karpathy.json"  # two captions per image: image -> text may match either
    annotations.write_text(json.dumps([{"image": "a.png", "caption": ["a red square", "red"]},
                                       {"image": "b.png", "caption": ["a blue circle", "blue"]}]))
    Image.new("RGB", (32, 32), (220, 30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), (30, 30, 220)).save(tmp_path / "b.png")
    assert evaluate.main([*args[:2], "--corpus", str(annotations), "--rerank-k", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["images"], report["texts"], report["metrics"]["i2t_r5"]) == (2, 4, 1.0)
    assert "itm_t2i_r1" not in report["metrics"]


# The gallery is checked in a real browser. Skips only on a developer machine without Chromium; with CI set
# (.ci/run installs Debian's chromium) it always runs, and a missing browser there fails instead of skipping.
@pytest.mark.skipif(not shutil.which("chromium") and not os.environ.get("CI"), reason="no Chromium here (CI installs it)")
def test_html_gallery_shows_every_hit_in_chromium(indexes, tmp_path, capsys):
    page = tmp_path / "hits.html"
    assert search.main(["--index", str(indexes[0]), "-k", "3", "--html", str(page), "a red circle", "a blue square"]) == 0
    capsys.readouterr()
    probe = tmp_path / "probe.html"  # the page plus a script that counts, once loaded, the images that decoded
    probe.write_text(page.read_text().replace("</body>", """<script>window.addEventListener("load", () => {
      const images = [...document.images];
      document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
      document.body.dataset.hits = document.querySelectorAll("figure.hit").length;
    });</script></body>"""))
    chromium = shutil.which("chromium")
    assert chromium, "CI is set but Chromium is missing: .ci/run installs the Debian chromium package"
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'data-loaded="6"' in done.stdout and 'data-hits="6"' in done.stdout
    assert done.stdout.count("<h2>") == 2  # a section per query
