"""A crawl's broken and unusual samples (tools/crawl_shards.py): every good sample is read, every bad one
skipped and counted once by reason, by the training loader, the image indexer and the text indexer."""

import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lavis_lite.data.samples import SkipCounter  # noqa: E402
from retrieval.corpus import Corpus, open_item_image  # noqa: E402
from tools import crawl_shards  # noqa: E402


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    out = tmp_path_factory.mktemp("crawl")
    return out, crawl_shards.write(out)


def test_every_reader_reads_the_good_and_counts_the_bad_once(crawl):
    out, expected = crawl
    rows = crawl_shards.check(out)
    assert [(r["corpus"], r["reader"]) for r in rows] == [("shards", "training"), ("shards", "index"), ("folder", "index")]
    for row in rows:
        assert row["good_read"] == row["good"] and not row["unexpected_reads"] and not row["duplicates"], row
        assert row["skipped"] == row["expected_skipped"], row
    assert rows[0]["good"] == 19 and rows[0]["bad"] == 12  # the table of samples, and two broken shards


def test_a_text_index_decodes_its_images_and_counts_the_bad_once(crawl):
    out, expected = crawl
    corpus = Corpus(str(out / "shards"), require_captions=True, max_pixels=crawl_shards.MAX_PIXELS)
    skipped = SkipCounter()
    keys = [e.key for e in corpus.decodable(corpus.entries(skipped), skipped, num_workers=2)]
    assert sorted(keys) == expected["shards"]["training"]["read"]
    assert skipped.as_dict() == expected["shards"]["training"]["skipped"]


def test_unusual_images_decode_as_users_see_them(crawl):
    out, _ = crawl
    upright = open_item_image({"path": str(out / "folder" / "exif-rotated.jpg")})
    assert upright.size == (32, 64)
    sixteen = open_item_image({"path": str(out / "folder" / "png16.png")})
    assert 60 < sum(sixteen.convert("L").getdata()) / (48 * 32) < 200  # scaled by range, not clipped to white
    for name in ("cmyk.jpg", "palette-transparent.png", "rgba.png", "la.png", "grayscale.jpg"):
        image = open_item_image({"path": str(out / "folder" / name)})
        assert image.mode == "RGB" and isinstance(image, Image.Image)
