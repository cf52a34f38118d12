"""Shards and an image folder with every kind of broken and unusual sample a web crawl produces, and a check
that lavis_lite's readers take every good sample and skip every bad one, counted once by reason.

    python tools/crawl_shards.py OUT_DIR            # write OUT_DIR/shards, OUT_DIR/folder, OUT_DIR/expected.json
    python tools/crawl_shards.py OUT_DIR --check    # ... and read them with the training loader and the indexer

Good samples: RGB, grayscale, CMYK, EXIF-rotated and progressive JPEGs, 16-bit, palette (with and without
transparency), RGBA and LA PNGs, WebP, a 1 x 1 image and a 2-megapixel one, captions in the `.json` only,
with control characters or outside ASCII. Bad ones: zero-byte, truncated and HTML-as-JPEG images, an image
whose header claims 3.6 gigapixels, non-UTF-8, blank and missing captions, a sample without an image, an
`.ico` as the only image, a tar cut short in the middle of a member and a file that is no tar at all.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from lavis_lite.data.samples import (
    CAPTION_NOT_UTF8,
    CORRUPT_IMAGE,
    EMPTY_CAPTION,
    IMAGE_TOO_LARGE,
    MISSING_CAPTION,
    MISSING_IMAGE,
    READ_ERROR,
    UNSUPPORTED_FILE,
)

MAX_PIXELS = 16_000_000  # the readers' pixel limit in the check (the default is larger)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A colourful picture: gradients and a block, so that a wrong conversion shows."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, int(rng.integers(0, 256)))], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _exif_rotated() -> bytes:
    """A 64 x 32 JPEG whose EXIF orientation (6: rotate 90 degrees clockwise) makes it 32 x 64 upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_picture((64, 32), 3), "JPEG", exif=exif.tobytes())


def _sixteen_bit() -> bytes:
    values = (np.arange(48 * 32, dtype=np.uint32).reshape(32, 48) * 40 % 65536).astype(np.uint16)
    return _encode(Image.fromarray(values), "PNG")  # mode I;16


def _claims_gigapixels() -> bytes:
    """A valid PNG of 1 x 1 pixel whose header says 60000 x 60000: only the header is read before the limit."""
    png = bytearray(_encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    png[ihdr : ihdr + 8] = struct.pack(">II", 60000, 60000)
    png[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(png[ihdr - 4 : ihdr + 13])))
    return bytes(png)


def _ico() -> bytes:
    return _encode(_picture((32, 32), 4), "ICO")


def samples() -> list[tuple[str, dict[str, bytes], Optional[str], Optional[str]]]:
    """(key, members {ext: bytes}, reason the training loader skips it or None, reason the image indexer
    skips it or None). The indexer keeps images without captions; training needs one."""
    jpeg = _encode(_picture((64, 48), 0), "JPEG", quality=90)
    caption = "a red circle above a blue square".encode()
    rgba = _picture((40, 40), 5).convert("RGBA")
    rgba.putalpha(128)
    palette_t = _picture((40, 40), 6).convert("P")
    palette_t.info["transparency"] = 0
    good = [
        ("rgb", {"jpg": jpeg, "txt": caption}),
        ("grayscale", {"jpg": _encode(_picture((64, 48), 1).convert("L"), "JPEG"), "txt": b"a grey picture"}),
        ("cmyk", {"jpg": _encode(_picture((64, 48), 2).convert("CMYK"), "JPEG"), "txt": b"a cmyk jpeg"}),
        ("progressive", {"jpg": _encode(_picture((64, 48), 7), "JPEG", progressive=True), "txt": b"progressive"}),
        ("exif-rotated", {"jpg": _exif_rotated(), "txt": b"a rotated photo"}),
        ("png16", {"png": _sixteen_bit(), "txt": b"a 16 bit png"}),
        ("palette", {"png": _encode(_picture((40, 40), 8).convert("P"), "PNG"), "txt": b"a palette png"}),
        ("palette-transparent", {"png": _encode(palette_t, "PNG"), "txt": b"a palette png with transparency"}),
        ("rgba", {"png": _encode(rgba, "PNG"), "txt": b"a translucent png"}),
        ("la", {"png": _encode(_picture((40, 40), 9).convert("LA"), "PNG"), "txt": b"a grey png with alpha"}),
        ("webp", {"webp": _encode(_picture((40, 40), 10), "WEBP"), "txt": b"a webp"}),
        ("one-pixel", {"png": _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), "txt": b"one red pixel"}),
        ("two-megapixels", {"jpg": _encode(_picture((1600, 1250), 11), "JPEG", quality=70), "txt": b"a big photo"}),
        ("json-caption", {"jpg": jpeg, "json": json.dumps({"caption": "a caption in the json"}).encode()}),
        ("control-characters", {"jpg": jpeg, "txt": "a cat\x1b[31m on a\tmat\x00".encode()}),
        ("unicode", {"jpg": jpeg, "txt": "ein Würfel über einem Kreis, 立方体".encode()}),
    ]
    bad = [
        ("zero-byte", {"jpg": b"", "txt": caption}, CORRUPT_IMAGE, CORRUPT_IMAGE),
        ("truncated-jpeg", {"jpg": jpeg[: len(jpeg) // 2], "txt": caption}, CORRUPT_IMAGE, CORRUPT_IMAGE),
        ("html-as-jpeg", {"jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "txt": caption},
         CORRUPT_IMAGE, CORRUPT_IMAGE),
        ("gigapixels", {"png": _claims_gigapixels(), "txt": caption}, IMAGE_TOO_LARGE, IMAGE_TOO_LARGE),
        ("latin-1-caption", {"jpg": jpeg, "txt": "caf\xe9 au lait".encode("latin-1")}, CAPTION_NOT_UTF8, CAPTION_NOT_UTF8),
        ("blank-caption", {"jpg": jpeg, "txt": b"  ... \n"}, EMPTY_CAPTION, None),
        ("no-caption", {"jpg": jpeg}, MISSING_CAPTION, None),
        ("bad-json-caption", {"jpg": jpeg, "json": b"{caption: oops"}, MISSING_CAPTION, None),
        ("no-image", {"txt": caption}, MISSING_IMAGE, MISSING_IMAGE),
        ("ico-only", {"ico": _ico(), "txt": caption}, MISSING_IMAGE, MISSING_IMAGE),
    ]
    return [(key, members, None, None) for key, members in good] + bad


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write(out_dir: str | Path) -> dict:
    """Write the shards and the folder; returns (and saves as expected.json) what each reader should do."""
    out_dir = Path(out_dir)
    shards, folder = out_dir / "shards", out_dir / "folder"
    shards.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    table = samples()
    (shards / "crawl-000000.tar").write_bytes(
        _tar([(f"{key}.{ext}", data) for key, members, _, _ in table for ext, data in members.items()])
    )
    # Cut short inside the last sample's image: the samples before it are read, the shard counts one read error.
    jpeg = _encode(_picture((200, 150), 12), "JPEG", quality=95)
    whole = [(f"cut-{i}.jpg", jpeg) for i in range(3)]
    whole = [m for i, (name, data) in enumerate(whole) for m in ((name, data), (f"cut-{i}.txt", b"a sample before the cut"))]
    full = _tar(whole + [("cut-lost.jpg", jpeg), ("cut-lost.txt", b"lost")])
    with tarfile.open(fileobj=io.BytesIO(full)) as tar:
        cut_at = tar.getmember("cut-lost.jpg").offset_data + len(jpeg) // 2
    (shards / "crawl-000001.tar").write_bytes(full[:cut_at])
    (shards / "crawl-000002.tar").write_bytes(b"<html><body>502 Bad Gateway</body></html>\n")  # not a tar at all

    training_skips, index_skips = Counter(), Counter()
    for _, _, train_reason, index_reason in table:
        training_skips.update([train_reason] if train_reason else [])
        index_skips.update([index_reason] if index_reason else [])
    training_skips[READ_ERROR] += 2
    index_skips[READ_ERROR] += 2
    index_skips[EMPTY_CAPTION] += 1  # the indexer keeps the blank-captioned image and counts the caption it drops
    cut = [f"cut-{i}" for i in range(3)]

    # The folder: one file per good image of the table (with its caption beside it), the bad image files, and
    # files that are no image lavis_lite reads (counted as unsupported_file).
    folder_good, folder_skips = [], Counter()
    for key, members, train_reason, _ in table:
        image = next(((ext, members[ext]) for ext in ("jpg", "png", "webp") if ext in members), None)
        if image is None:
            continue
        (folder / f"{key}.{image[0]}").write_bytes(image[1])
        if train_reason in (CORRUPT_IMAGE, IMAGE_TOO_LARGE):
            folder_skips[train_reason] += 1
        else:
            folder_good.append(f"{key}.{image[0]}")
    (folder / "favicon.ico").write_bytes(_ico())
    (folder / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (folder / "notes.md").write_text("not an image\n")
    folder_skips[UNSUPPORTED_FILE] += 3

    expected = {
        "shards": {
            "training": {"read": sorted([k for k, _, r, _ in table if r is None] + cut), "skipped": dict(training_skips)},
            "index": {"read": sorted([k for k, _, _, r in table if r is None] + cut), "skipped": dict(index_skips)},
        },
        "folder": {"index": {"read": sorted(folder_good), "skipped": dict(folder_skips)}},
    }
    (out_dir / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return expected


def read_with_training_loader(shards: Path) -> tuple[list[str], dict[str, int]]:
    """The keys the training loader's evaluation pass yields, and its skip counts."""
    from transformers import BertTokenizerFast

    from lavis_lite.data.config import DataConfig
    from lavis_lite.data.samples import Collator, SkipCounter
    from lavis_lite.data.transforms import PairTransform
    from lavis_lite.data.webdataset_pipeline import build_wds_pipeline

    vocab = shards.parent / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    cfg = DataConfig(batch_size=4, num_workers=0, max_image_pixels=MAX_PIXELS)
    transform = PairTransform.from_config(cfg, 32, (0.5,) * 3, (0.5,) * 3, train=False)
    pipeline = build_wds_pipeline(str(shards), transform, Collator(BertTokenizerFast(str(vocab))), cfg, train=False)
    keys, skipped = [], SkipCounter()
    for batch in pipeline:
        keys += batch["key"]
        skipped.update(batch)
    return sorted(keys), skipped.as_dict()


def read_with_indexer(path: Path) -> tuple[list[str], dict[str, int]]:
    """The keys an image index would hold (entries listed, images decoded), and the skip counts."""
    from lavis_lite.data.samples import SkipCounter
    from lavis_lite.retrieval.corpus import Corpus

    corpus = Corpus(str(path), max_pixels=MAX_PIXELS)
    skipped = SkipCounter()
    keys = [e.key for kept, _ in corpus.pixel_batches(corpus.entries(skipped), _tensor, 8, skipped, 2) for e in kept]
    return sorted(keys), skipped.as_dict()


def _tensor(image: Image.Image):
    import torch

    return torch.from_numpy(np.asarray(image.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)


def check(out_dir: str | Path) -> list[dict]:
    """Read every corpus with every reader; one row per (corpus, reader) with what was read and skipped."""
    out_dir = Path(out_dir)
    expected = json.loads((out_dir / "expected.json").read_text())
    readers = {"training": read_with_training_loader, "index": read_with_indexer}
    rows = []
    for corpus, by_reader in expected.items():
        for reader, want in by_reader.items():
            keys, skipped = readers[reader](out_dir / corpus)
            rows.append({
                "corpus": corpus, "reader": reader,
                "good": len(want["read"]), "good_read": len(set(keys) & set(want["read"])),
                "unexpected_reads": sorted(set(keys) - set(want["read"])), "duplicates": len(keys) - len(set(keys)),
                "bad": sum(want["skipped"].values()), "skipped": skipped, "expected_skipped": want["skipped"],
            })
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the crawl-like corpora into")
    parser.add_argument("--check", action="store_true", help="read them back with the training loader and the indexer")
    args = parser.parse_args(argv)
    write(args.out_dir)
    print(f"wrote {args.out_dir}/shards, {args.out_dir}/folder and {args.out_dir}/expected.json")
    if not args.check:
        return 0
    ok = True
    print("| corpus | reader | good samples read | bad samples skipped, by reason | as expected |")
    print("|---|---|---:|---|---|")
    for row in check(args.out_dir):
        same = row["skipped"] == row["expected_skipped"] and row["good_read"] == row["good"] and not row["unexpected_reads"] and not row["duplicates"]
        ok &= same
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(row["skipped"].items()))
        print(f"| {row['corpus']} | {row['reader']} | {row['good_read']} / {row['good']} | {sum(row['skipped'].values())} / {row['bad']}: {reasons} | {'yes' if same else 'NO'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
