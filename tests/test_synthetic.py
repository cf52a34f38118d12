"""The synthetic captioned-shapes data: determinism, truthful captions, held-out split, manifest, flips."""

import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lavis_lite.data import Collator, DataConfig, PairTransform, SkipCounter, build_wds_pipeline, list_shards
from lavis_lite.demo import synthetic
from lavis_lite.demo.synthetic import COLOURS, SHAPES, SIZES, WHERE, generate, make_example
from conftest import save_bert_tokenizer

PHRASE = r"(?:small|large) \w+ \w+"
# "<phrase A> ... <phrase B>": which phrase is first along the layout's axis (left or top)
PAIR_PATTERNS = [
    (re.compile(rf"a ({PHRASE}) (?:on the left|at the top) and a ({PHRASE}) (?:on the right|at the bottom)"), 0),
    (re.compile(rf"a ({PHRASE}) (?:on the right|at the bottom) and a ({PHRASE}) (?:on the left|at the top)"), 1),
    (re.compile(rf"a ({PHRASE}) (?:to the left of|above) a ({PHRASE})"), 0),
    (re.compile(rf"a ({PHRASE}) (?:to the right of|below) a ({PHRASE})"), 1),
]


def first_along_axis(caption: str) -> str:
    """The phrase of the object that a pair caption puts on the left (or at the top)."""
    for pattern, first in PAIR_PATTERNS:
        match = pattern.fullmatch(caption)
        if match:
            return match.group(first + 1)
    raise AssertionError(f"unparsed caption: {caption!r}")


def phrase(obj: dict) -> str:
    return f"{obj['size']} {obj['colour']} {obj['shape']}"


def test_same_seed_same_bytes_other_seed_other_bytes():
    a = [make_example(0, "train", i, 64) for i in range(5)]
    assert a == [make_example(0, "train", i, 64) for i in range(5)]
    assert all(x[0] != make_example(1, "train", i, 64)[0] for i, x in enumerate(a))


def test_captions_name_every_attribute_truthfully():
    layouts = set()
    for index in range(300):
        jpeg, caption, meta = make_example(3, "val", index, 32)
        assert meta["caption"] == caption and Image.open(io.BytesIO(jpeg)).size == (32, 32)
        layouts.add(meta["layout"])
        objects = meta["objects"]
        assert len(objects) == (1 if meta["layout"] == "single" else 2)
        for obj in objects:
            assert obj["shape"] in SHAPES and obj["colour"] in COLOURS and obj["size"] in SIZES
            assert phrase(obj) in caption
        if meta["layout"] == "single":
            assert caption.endswith(f"{phrase(objects[0])} {WHERE[objects[0]['position']]}")
        else:
            assert [o["position"] for o in objects] in (["left", "right"], ["top", "bottom"])
            axis = 0 if meta["layout"] == "left_right" else 1
            assert objects[0]["center"][axis] < 0.5 < objects[1]["center"][axis]
            assert first_along_axis(caption) == phrase(objects[0])
    assert layouts == {"single", "left_right", "top_bottom"}


def test_attributes_are_drawn_where_the_json_says():
    for index in range(40):
        jpeg, _, meta = make_example(0, "train", index, 128)
        pixels = np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.int32)
        for obj in meta["objects"]:
            x, y = (int(c * 128) for c in obj["center"])
            assert np.abs(pixels[y, x] - COLOURS[obj["colour"]]).max() < 40, (index, obj)


def test_train_and_val_use_disjoint_seed_streams():
    train = {make_example(0, "train", i, 32)[0] for i in range(100)}
    val = {make_example(0, "val", i, 32)[0] for i in range(100)}
    assert len(train) == len(val) == 100 and not train & val


def shard_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def test_generate_writes_shards_and_manifest_and_skips_reruns(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    manifest = generate(out, train=40, val=10, image_size=32, seed=5, shard_size=16, workers=2, progress=False)
    assert sorted(shard_bytes(out)) == [f"train/shard-00000{i}.tar" for i in range(3)] + ["val/shard-000000.tar"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["params"] == {
        "generator_version": synthetic.GENERATOR_VERSION,
        "seed": 5,
        "image_size": 32,
        "quality": 90,
        "shard_size": 16,
        "counts": {"train": 40, "val": 10},
    }
    assert manifest["splits"]["train"]["count"] == 40 and manifest["val_stats"]["images"] == 10
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left
    with tarfile.open(out / "train/shard-000002.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["train_0000032.jpg", "train_0000032.txt", "train_0000032.json"] and len(names) == 24

    # same parameters in one process: same bytes; the existing complete output is not rewritten
    other = tmp_path / "again"
    generate(other, train=40, val=10, image_size=32, seed=5, shard_size=16, workers=1, progress=False)
    assert shard_bytes(other) == shard_bytes(out)
    monkeypatch.setattr(synthetic, "write_shard", lambda task: pytest.fail("rerun rewrote a shard"))
    assert generate(out, train=40, val=10, image_size=32, seed=5, shard_size=16, progress=False) == manifest
    monkeypatch.undo()

    # new parameters: regenerated, stale shards removed
    manifest = generate(out, train=20, val=10, image_size=32, seed=5, shard_size=16, progress=False)
    assert sorted(shard_bytes(out)) == ["train/shard-000000.tar", "train/shard-000001.tar", "val/shard-000000.tar"]
    assert manifest["params"]["counts"]["train"] == 20


def test_interrupted_generation_leaves_no_manifest_and_no_partial_shard(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    real = synthetic.make_example

    def failing(seed, split, index, *args):
        if split == "train" and index == 20:
            raise KeyboardInterrupt
        return real(seed, split, index, *args)

    monkeypatch.setattr(synthetic, "make_example", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(out, train=40, val=4, image_size=32, shard_size=16, workers=1, progress=False)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.tar"]
    monkeypatch.undo()
    manifest = generate(out, train=40, val=4, image_size=32, shard_size=16, workers=1, progress=False)
    assert len(manifest["splits"]["train"]["shards"]) == 3 and (out / "manifest.json").exists()


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        synthetic.main(["--help"])
    assert exit_.value.code == 0 and "--image-size" in capsys.readouterr().out
    synthetic.main(["--out", str(tmp_path), "--train", "8", "--val", "4", "--image-size", "32", "--workers", "1"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["train"] == 8 and printed["val_stats"]["images"] == 4


def test_duplication_stats():
    summary = [("a", ("s", 1)), ("a", ("s", 1)), ("b", ("s", 1)), ("c", ("s", 2))]
    stats = synthetic.duplication_stats(summary)
    assert stats == {
        "images": 4,
        "distinct_captions": 3,
        "images_sharing_caption": 0.5,
        "distinct_scenes": 2,
        "images_sharing_scene": 0.75,
    }


def test_flip_with_swap_keeps_captions_true():
    """Flipped images get "left"/"right" swapped captions; without the swap, flipped captions are false."""
    examples = []
    for index in range(200):
        jpeg, caption, meta = make_example(0, "train", index, 64)
        a, b = meta["objects"] if meta["layout"] == "left_right" else (None, None)
        if a and a["colour"] != b["colour"]:
            examples.append((Image.open(io.BytesIO(jpeg)).convert("RGB"), caption, meta))
    assert len(examples) >= 20
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    for swap in (True, False):
        transform = PairTransform(64, mean, std, train=True, crop_scale=(1.0, 1.0), flip_swaps_left_right=swap)
        flips = truthful = 0
        for seed, (image, caption, meta) in enumerate(examples[:20]):
            torch.manual_seed(seed)
            pixels, text = transform(image, caption)
            left = first_along_axis(text)
            obj = next(o for o in meta["objects"] if phrase(o) == left)
            # where the original left object now is: flipped iff its pixels moved to the mirrored side
            x, y = (int(c * 64) for c in obj["center"])
            rgb = ((pixels[:, y] * 0.5 + 0.5) * 255).T.numpy()  # [64, 3] row through the object
            seen_left = np.abs(rgb[x] - COLOURS[obj["colour"]]).max() < 40
            seen_mirrored = np.abs(rgb[63 - x] - COLOURS[obj["colour"]]).max() < 40
            flips += text != caption if swap else seen_mirrored and not seen_left
            truthful += (obj["position"] == "left" and seen_left) or (obj["position"] == "right" and seen_mirrored)
        assert 3 <= flips <= 17
        assert truthful == 20 if swap else truthful == 20 - flips


def test_synthetic_shards_load_without_skips(tmp_path):
    """Train shards go through the pipeline untouched, and captions use only the templates' words."""

    from lavis_lite.models.tokenizer import build_tokenizer

    templates = [*synthetic.SINGLE_TEMPLATES, *(t for ts in synthetic.PAIR_TEMPLATES.values() for t in ts)]
    words = {w for t in templates for w in t.split() if "{" not in w}
    words |= {w for c in WHERE.values() for w in c.split()} | set(SHAPES) | set(COLOURS) | set(SIZES)
    tokenizer = build_tokenizer(save_bert_tokenizer(tmp_path / "tok", sorted(words)))
    generate(tmp_path / "syn", train=16, val=8, image_size=32, shard_size=8, workers=1, progress=False)
    cfg = DataConfig(batch_size=8, flip_swaps_left_right=True)
    transform = PairTransform.from_config(cfg, 32, (0.5,) * 3, (0.5,) * 3, train=True)
    shards = list_shards(tmp_path / "syn" / "train")
    pipeline = build_wds_pipeline(shards, transform, Collator(tokenizer), cfg, train=True)
    batch = next(iter(pipeline))
    counter = SkipCounter()
    counter.update(batch)
    assert batch["image"].shape == (8, 3, 32, 32) and counter.total == 0
    assert not (batch["input_ids"] == tokenizer.unk_token_id).any()
