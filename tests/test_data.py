"""The data pipelines: webdataset shards and annotation files to batches, with bad samples skipped and counted."""

import csv
import dataclasses
import io
import json
import logging
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lavis_lite.data import (
    AnnotationDataset,
    Collator,
    DataConfig,
    PairTransform,
    Sample,
    SkipCounter,
    build_wds_pipeline,
    caption_id,
    clean_caption,
    create_annotation_loader,
    create_wds_loader,
    list_shards,
    read_karpathy,
    read_karpathy_eval,
    read_table,
    swap_left_right,
)
from lavis_lite.models.tokenizer import build_tokenizer
from conftest import save_bert_tokenizer
from retrieval.corpus import Corpus

WORDS = "a an the of on and to large small red green blue circle square dog cat photo left right".split()
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 16
BAD = {"corrupt_image": 1, "empty_caption": 1, "missing_caption": 1}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return build_tokenizer(save_bert_tokenizer(root, WORDS))


def jpeg(colour, size=(24, 20), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path, samples):
    """samples: [(key, {ext: bytes})]"""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def good_samples(n, start=0):
    captions = ["a large red circle", "a small blue square on the left", "a photo of a dog", "The Cat!"]
    out = []
    for i in range(start, start + n):
        files = {"jpg": jpeg((10 * i % 255, 80, 160)), "txt": captions[i % len(captions)].encode()}
        out.append((f"good{i:03d}", files))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards: 10 good samples (one captioned only in its json, one png) and 3 bad ones."""
    root = tmp_path_factory.mktemp("shards")
    first = good_samples(5)
    first.insert(2, ("bad_corrupt", {"jpg": np.random.default_rng(0).bytes(300), "txt": b"a red circle"}))
    first.append(("bad_empty", {"jpg": jpeg((0, 0, 0)), "txt": b" .!!  ;"}))
    second = good_samples(3, start=5)
    caption_in_json = json.dumps({"caption": "a green square"}).encode()
    second.append(("good008", {"png": jpeg((1, 2, 3), fmt="PNG"), "json": caption_in_json}))
    second.append(("bad_nocaption", {"jpg": jpeg((5, 5, 5)), "json": b'{"width": 24}'}))
    second.append(("good009", {"jpeg": jpeg((9, 9, 9)), "txt": b"a small red circle on the right"}))
    write_tar(root / "shard-000000.tar", first)
    write_tar(root / "shard-000001.tar", second)
    keys = [k for k, _ in first + second if k.startswith("good")]
    return root, keys


def loader(source, tokenizer, train=False, **overrides):
    cfg = DataConfig(**{"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, **overrides})
    return create_wds_loader(source, tokenizer, cfg, image_size=SIZE, mean=MEAN, std=STD, max_text_len=8, train=train)


def drain(batches, limit=None):
    keys, counter = [], SkipCounter()
    for batch in batches:
        keys += batch["key"]
        counter.update(batch)
        if limit is not None and len(keys) >= limit:
            break
    return keys, counter


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_pipeline_skips_exactly_the_bad_samples(shards, tokenizer, num_workers, caplog):
    root, good = shards
    with caplog.at_level(logging.WARNING, logger="lavis_lite.data"):
        keys, counter = drain(loader(root, tokenizer, num_workers=num_workers))
    assert sorted(keys) == sorted(good) and len(keys) == len(set(keys))
    assert counter.as_dict() == BAD and counter.total == 3
    assert counter.summary() == "skipped 3 samples: corrupt_image=1, empty_caption=1, missing_caption=1"
    if num_workers == 0:  # worker processes log in their own process
        assert "'bad_corrupt': corrupt_image" in caplog.text


@pytest.mark.parametrize("num_workers", [0, 2])
def test_finite_train_pipeline_skips_and_drops_only_the_last_partial_batch(shards, tokenizer, num_workers):
    root, good = shards
    keys, counter = drain(loader(root, tokenizer, train=True, resampled=False, batch_size=5, num_workers=num_workers))
    # 0 workers: 10 good samples, two full batches; 2 workers: one shard each, 5 good samples, one batch
    assert sorted(keys) == sorted(good)
    assert counter.as_dict() == BAD


def test_batch_fields_and_padding(shards, tokenizer):
    root, _ = shards
    batch = next(iter(loader(root, tokenizer, batch_size=10)))
    B = len(batch["key"])
    assert B == 10
    assert batch["image"].shape == (B, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == batch["sample_id"].dtype == torch.long
    assert ids.shape == mask.shape and ids.shape[0] == B and ids.shape[1] <= 8
    assert set(batch) == {"image", "input_ids", "attention_mask", "sample_id", "key", "caption", "skipped"}
    assert len(batch["caption"]) == B and batch["skipped"] == BAD
    for row, caption in enumerate(batch["caption"]):
        assert caption == clean_caption(caption)  # already cleaned: "The Cat!" -> "the cat"
        expected = tokenizer(caption, truncation=True, max_length=8)["input_ids"]
        n = int(mask[row].sum())
        assert ids[row, :n].tolist() == expected
        assert mask[row, :n].eq(1).all() and mask[row, n:].eq(0).all()
        assert ids[row, n:].eq(tokenizer.pad_token_id).all()
        assert ids[row, 0] == tokenizer.cls_token_id and ids[row, n - 1] == tokenizer.sep_token_id
    assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest in the batch, not to max_text_len
    assert "the cat" in batch["caption"]
    # equal captions, equal ids; different captions, different ids
    for i in range(B):
        for j in range(B):
            same = batch["caption"][i] == batch["caption"][j]
            assert (batch["sample_id"][i] == batch["sample_id"][j]).item() == same
    assert batch["sample_id"][0].item() == caption_id(batch["caption"][0]) >= 0


def test_padding_to_longest_and_truncation_to_max_text_len(tokenizer):
    collate = Collator(tokenizer, max_text_len=6)
    pixels = torch.zeros(3, 2, 2)
    long = "a large red circle on the left and a small blue square on the right"
    batch = collate([Sample(pixels, long, "k"), Sample(pixels, "a dog", "j")], {})
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0, -1] == tokenizer.sep_token_id and batch["attention_mask"][0].all()
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    short = collate([Sample(pixels, "a dog", "j"), Sample(pixels, "a red dog", "k")], {})
    assert short["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_resampled_mode_is_endless(shards, tokenizer):
    root, good = shards
    keys, counter = drain(loader(root, tokenizer, train=True, resampled=True), limit=3 * len(good))
    assert len(keys) >= 3 * len(good) and set(keys) <= set(good)
    assert set(counter.as_dict()) <= set(BAD)


def test_shard_shuffling_changes_order_between_epochs(tmp_path, tokenizer):
    for s in range(6):
        write_tar(tmp_path / f"shard-{s:06d}.tar", good_samples(2, start=2 * s))
    dl = loader(tmp_path, tokenizer, train=True, resampled=False, batch_size=2, shuffle_buffer=1)
    first, _ = drain(dl)
    second, _ = drain(dl)
    assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("num_shards", [1, 4])
def test_split_by_worker_gives_every_sample_once(tmp_path, tokenizer, num_shards):
    """4 shards: split by shard across the 2 workers; 1 shard: both workers read it, each keeps half the samples."""
    keys = []
    for s in range(num_shards):
        samples = good_samples(12 // num_shards, start=s * 12 // num_shards)
        write_tar(tmp_path / f"shard-{s:06d}.tar", samples)
        keys += [k for k, _ in samples]
    got, _ = drain(loader(tmp_path, tokenizer, num_workers=2, batch_size=2))
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))
    again, _ = drain(loader(tmp_path, tokenizer, num_workers=2, batch_size=2))
    assert again == got  # eval order is deterministic


@pytest.mark.parametrize("num_shards", [1, 4])
def test_split_by_node_partitions_samples(tmp_path, tokenizer, num_shards, monkeypatch):
    keys = []
    for s in range(num_shards):
        samples = good_samples(8 // num_shards, start=s * 8 // num_shards)
        write_tar(tmp_path / f"shard-{s:06d}.tar", samples)
        keys += [k for k, _ in samples]
    transform = PairTransform(SIZE, MEAN, STD, train=False)
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        pipeline = build_wds_pipeline(tmp_path, transform, Collator(tokenizer), DataConfig(batch_size=3), train=False)
        per_rank.append(drain(pipeline)[0])
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)


def test_list_shards(shards, tmp_path):
    root, _ = shards
    assert list_shards(root) == [str(root / "shard-000000.tar"), str(root / "shard-000001.tar")]
    assert list_shards(f"{root}/shard-{{000000..000001}}.tar") == list_shards(root)
    assert list_shards([str(root / "shard-000001.tar"), root / "shard-000000.tar"])[0].endswith("1.tar")
    with pytest.raises(FileNotFoundError):
        list_shards(tmp_path)


def test_clean_caption_matches_lavis():
    assert clean_caption("A  Dog; running (fast)!!\n") == "a dog running fast"
    assert clean_caption("one two three four", max_words=2) == "one two"
    assert clean_caption(" .!;~ ") == ""
    assert swap_left_right("left of the right, leftover") == "right of the left, leftover"


def test_flip_swaps_left_right_when_asked():
    """An image red on the left half, blue on the right; the caption must follow the pixels."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:] = (0, 0, 255)
    image, caption = Image.fromarray(pixels), "red on the left and blue on the right"
    for swap in (True, False):
        transform = PairTransform(16, MEAN, STD, train=True, crop_scale=(0.9, 1.0), flip_swaps_left_right=swap)
        flips = consistent = 0
        for seed in range(30):
            torch.manual_seed(seed)
            out, text = transform(image, caption)
            left_is_red = out[0, :, 0].mean() > out[2, :, 0].mean()
            flips += not left_is_red
            truth = "red on the left and blue on the right" if left_is_red else "red on the right and blue on the left"
            consistent += text == truth
        assert 0 < flips < 30
        assert consistent == (30 if swap else 30 - flips)
    no_flip = PairTransform(16, MEAN, STD, train=True, hflip=False)
    assert all(no_flip(image, caption)[0][0, :, 0].mean() > 0 for _ in range(10))


def test_eval_transform_is_a_resize():
    image = Image.fromarray(np.full((20, 30, 3), 128, np.uint8))
    out, text = PairTransform(SIZE, MEAN, STD, train=False)(image, "a left")
    assert out.shape == (3, SIZE, SIZE) and text == "a left"
    assert torch.allclose(out, torch.full_like(out, (128 / 255 - 0.5) / 0.25), atol=1e-5)


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "img").mkdir()
    for name, colour in [("a.jpg", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.jpg", (0, 0, 255))]:
        Image.new("RGB", (20, 20), colour).save(tmp_path / "img" / name)
    (tmp_path / "img" / "bad.jpg").write_bytes(b"not an image")
    return tmp_path


def test_karpathy_train_and_eval(image_folder, tokenizer):
    root = image_folder
    train = [
        {"image": "a.jpg", "caption": "A red circle.", "image_id": "1"},
        {"image": "b.png", "caption": ["a green square", "a square"], "image_id": "2"},
        {"image": "missing.jpg", "caption": "a dog", "image_id": "3"},
    ]
    (root / "train.json").write_text(json.dumps(train))
    records = read_karpathy(root / "train.json", root / "img")
    assert [r.key for r in records] == ["a.jpg#0", "b.png#0", "b.png#1", "missing.jpg#0"]
    dataset = AnnotationDataset(records, PairTransform(SIZE, MEAN, STD, train=True))
    assert dataset[0].caption == "a red circle" and dataset[0].image.shape == (3, SIZE, SIZE)
    assert dataset[3].reason == "missing_image"
    cfg = DataConfig(batch_size=3, num_workers=0, resampled=False)
    keys, counter = drain(create_annotation_loader(dataset, tokenizer, cfg, max_text_len=8, train=True))
    assert sorted(keys) == ["a.jpg#0", "b.png#0", "b.png#1"] and counter.as_dict() == {"missing_image": 1}

    test = [
        {"image": "a.jpg", "caption": ["a red one", "red!", ".;"]},
        {"image": "missing.jpg", "caption": ["x", "y"]},
        {"image": "c.jpg", "caption": ["a blue one", "blue"]},
        {"image": "bad.jpg", "caption": ["broken"]},
    ]
    (root / "test.json").write_text(json.dumps(test))
    rset = read_karpathy_eval(root / "test.json", root / "img", PairTransform(SIZE, MEAN, STD, train=False))
    assert rset.images == ["a.jpg", "c.jpg", "bad.jpg"]
    assert rset.texts == ["a red one", "red", "a blue one", "blue", "broken"]
    assert rset.txt2img == [0, 0, 1, 1, 2] and rset.img2txt == [[0, 1], [2, 3], [4]]
    assert rset.skipped.as_dict() == {"empty_caption": 1, "missing_image": 1}
    for num_workers in (0, 2):
        cfg = DataConfig(batch_size=2, num_workers=num_workers)
        keys, counter = drain(create_annotation_loader(rset.dataset, tokenizer, cfg, max_text_len=8, train=False))
        assert sorted(keys) == ["a.jpg", "c.jpg"] and counter.as_dict() == {"corrupt_image": 1}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_table_round_trip(image_folder, tokenizer, fmt):
    root = image_folder
    rows = [
        {"image_path": "img/a.jpg", "caption": "A red square"},
        {"image_path": "img/b.png", "caption": "a green square"},
        {"image_path": "img/missing.jpg", "caption": "a dog"},
        {"image_path": "img/c.jpg", "caption": "!!"},
        {"image_path": "img/bad.jpg", "caption": "a cat"},
    ]
    path = root / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"image_path": "img/c.jpg"}) + "\n")
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image_path", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    records = read_table(path)
    assert [r.image_path for r in records[:5]] == [str(root / r["image_path"]) for r in rows]
    assert [r.caption for r in records[:5]] == [r["caption"] for r in rows]
    dataset = AnnotationDataset(records, PairTransform(SIZE, MEAN, STD, train=False))
    for num_workers in (0, 2):
        cfg = DataConfig(batch_size=3, num_workers=num_workers)
        keys, counter = drain(create_annotation_loader(dataset, tokenizer, cfg, max_text_len=8, train=False))
        assert sorted(keys) == ["0", "1"]
        expected = {"missing_image": 1, "empty_caption": 1, "corrupt_image": 1}
        if fmt == "jsonl":
            expected["missing_caption"] = 1
        assert counter.as_dict() == expected


def test_endless_annotation_loader_keeps_full_batches(image_folder, tokenizer):
    path = image_folder / "few.jsonl"
    rows = [("img/a.jpg", "a red one"), ("img/b.png", "a green one"), ("img/bad.jpg", "a bad one")]
    path.write_text("".join(json.dumps({"image_path": p, "caption": c}) + "\n" for p, c in rows))
    dataset = AnnotationDataset(read_table(path), PairTransform(SIZE, MEAN, STD, train=True))
    cfg = DataConfig(batch_size=3, num_workers=0, resampled=True)
    batches = iter(create_annotation_loader(dataset, tokenizer, cfg, max_text_len=8, train=True))
    keys, counter = drain(next(batches) for _ in range(4))
    assert len(keys) == 12 and Counter(keys) == {"0": 6, "1": 6}
    # one per epoch: 12 good samples = 6 epochs; a batch leaves when the next good sample arrives, so the
    # 7th epoch's bad item rides along when it comes before that epoch's first good one
    assert counter.as_dict()["corrupt_image"] in (6, 7)


def test_skip_counter_sums_batches():
    counter = SkipCounter()
    counter.update({"skipped": {"corrupt_image": 2}})
    counter.update({"skipped": {}})
    counter.update({"skipped": {"corrupt_image": 1, "missing_caption": 1}})
    assert counter.total == 4 and counter.as_dict() == {"corrupt_image": 3, "missing_caption": 1}
    assert SkipCounter().summary() == "skipped 0 samples"


def test_unreadable_shard_is_counted_not_fatal(tmp_path, tokenizer):
    write_tar(tmp_path / "shard-000000.tar", good_samples(3))
    (tmp_path / "shard-000001.tar").write_bytes(np.random.default_rng(1).bytes(2000))
    keys, counter = drain(loader(tmp_path, tokenizer))
    assert sorted(keys) == ["good000", "good001", "good002"]
    assert counter.as_dict() == {"read_error": 1}


def test_finite_training_stream_runs_pass_after_pass(shards, tokenizer):
    """`data.resampled=false`: step-based training goes on past the end of the shards, a fresh pass each time."""
    from itertools import islice
    from types import SimpleNamespace

    from lavis_lite.config import ConfigError, VisionConfig
    from lavis_lite.data.training_data import TrainingData

    root, good = shards
    cfg = DataConfig(train_shards=str(root), batch_size=4, num_workers=0, shuffle_buffer=8, resampled=False, cache_features=False)
    encoder = SimpleNamespace(mean=MEAN, std=STD)
    data = TrainingData(cfg, VisionConfig(image_size=SIZE), encoder, tokenizer, 8, SkipCounter())
    batches = list(islice(data.training_batches()(0), 7))  # one pass holds 2 full batches of the 10 good samples
    assert len(batches) == 7
    passes = [sum((b["key"] for b in batches[i : i + 2]), []) for i in (0, 2, 4)]
    for keys in passes:
        assert len(set(keys)) == 8 and set(keys) <= set(good)
    assert len({tuple(keys) for keys in passes}) > 1  # each pass is reshuffled

    too_big = TrainingData(dataclasses.replace(cfg, batch_size=64), VisionConfig(image_size=SIZE), encoder, tokenizer, 8, SkipCounter())
    with pytest.raises(ConfigError, match="no full batch"):
        next(too_big.training_batches()(0))


def test_captions_that_are_not_utf8_are_skipped_and_counted(tmp_path, tokenizer):
    samples = good_samples(2)
    samples.append(("bad_latin1", {"jpg": jpeg((9, 9, 9)), "txt": "un cercle rouge à gauche".encode("latin-1")}))
    samples.append(("bad_json", {"jpg": jpeg((9, 9, 9)), "json": b'{"caption": "\xff\xfe"}'}))
    write_tar(tmp_path / "shard-000000.tar", samples)
    keys, counter = drain(loader(tmp_path, tokenizer))
    assert sorted(keys) == ["good000", "good001"]
    assert counter.as_dict() == {"caption_not_utf8": 2}
    corpus_skips = SkipCounter()
    entries = list(Corpus(str(tmp_path)).entries(corpus_skips))
    assert [entry.key for entry in entries] == ["good000", "good001"]
    assert corpus_skips.as_dict() == {"caption_not_utf8": 2}
