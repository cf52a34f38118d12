"""An index's metadata is data, not paths to trust: locators must point inside the corpus the index was built
from, with plausible sizes; captions printed to a terminal have their control characters escaped."""

import pytest
from PIL import Image

from lavis_lite.inference.preprocess import ImageError
from retrieval.corpus import MAX_ITEM_BYTES, corpus_roots, open_item_image
from retrieval.search import QueryResult, format_table


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(root / "red.png")
    (tmp_path / "secret.png").write_bytes((root / "red.png").read_bytes())
    return root, corpus_roots({"kind": "folder", "path": str(root), "image_root": None})


def test_a_locator_inside_the_corpus_opens(corpus):
    root, roots = corpus
    assert open_item_image({"path": str(root / "red.png")}, roots).size == (8, 8)


@pytest.mark.parametrize("locator", [
    {"path": "{root}/../secret.png"},
    {"path": "/etc/passwd"},
    {"path": "{root}x/red.png"},  # a sibling whose name starts like the root
    {"shard": "/etc/hosts", "offset": 0, "size": 10},
    {"shard": "{root}/red.png", "offset": 0, "size": MAX_ITEM_BYTES + 1},
    {"shard": "{root}/red.png", "offset": -5, "size": 10},
    {"shard": 42, "offset": 0, "size": 10},
    "not a locator",
])
def test_a_locator_outside_the_corpus_or_implausible_is_refused(corpus, locator):
    root, roots = corpus
    if isinstance(locator, dict):
        locator = {k: v.format(root=root) if isinstance(v, str) else v for k, v in locator.items()}
    with pytest.raises(ImageError, match="outside its corpus|implausible|malformed"):
        open_item_image(locator, roots)


def test_an_annotation_file_corpus_roots_at_its_folder_and_image_root(tmp_path):
    roots = corpus_roots({"kind": "table", "path": str(tmp_path / "a" / "pairs.jsonl"), "image_root": str(tmp_path / "b")})
    assert roots == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_control_characters_in_captions_are_escaped_in_the_table():
    hit = {"rank": 1, "score": 0.5, "itc": 0.5, "itm": None, "caption": "a red\x1b[2J circle", "key": "k\x07"}
    table = format_table([QueryResult("query\x1b]0;title\x07", [hit])], "text")
    assert "\x1b" not in table and "\x07" not in table
    assert "a red\\x1b[2J circle" in table and "query\\x1b]0;title\\x07" in table
