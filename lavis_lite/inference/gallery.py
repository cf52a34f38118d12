"""Self-contained HTML galleries: images (embedded as data URIs) with lines of text, e.g. captions or hits."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lavis_lite.io import atomic_write_text

_MIME = {b"\xff\xd8": "image/jpeg", b"\x89P": "image/png", b"RI": "image/webp"}


@dataclass
class GalleryItem:
    image: bytes  # encoded JPEG / PNG / WebP
    title: str = ""
    lines: list[str] = field(default_factory=list)


@dataclass
class GallerySection:
    """A titled row of cards, e.g. one query's hits."""

    title: str
    items: list[GalleryItem]


def thumbnail(image: Image.Image, max_px: int = 256) -> bytes:
    """JPEG bytes of `image` shrunk to fit `max_px` square: keeps pages small whatever the source's size or format."""
    small = image.convert("RGB")
    small.thumbnail((max_px, max_px))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _data_uri(image: bytes) -> str:
    mime = _MIME.get(image[:2], "image/jpeg")
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def _cards(items: list[GalleryItem]) -> str:
    cards = []
    for item in items:
        lines = "".join(f"<p>{html.escape(line)}</p>" for line in item.lines)
        cards.append(
            f'<figure class="hit"><img src="{_data_uri(item.image)}" alt="{html.escape(item.title)}">'
            f"<figcaption><b>{html.escape(item.title)}</b>{lines}</figcaption></figure>"
        )
    return f'<div class="grid">{"".join(cards)}</div>'


def write_gallery(path: str | Path, title: str, items: list[GalleryItem], thumbnail_px: int = 192) -> Path:
    """Write an HTML page of `items` as cards (image, title, text lines), atomically; returns its path."""
    return write_sections(path, title, [GallerySection("", items)], thumbnail_px)


def write_sections(path: str | Path, title: str, sections: list[GallerySection], thumbnail_px: int = 192) -> Path:
    """Write an HTML page of titled sections of cards (e.g. one per query), atomically; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(
        (f'<section><h2>{html.escape(s.title)}</h2>' if s.title else "<section>") + _cards(s.items) + "</section>"
        for s in sections
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure.hit {{ width: {thumbnail_px + 120}px; margin: 0; }}
figure.hit img {{ width: {thumbnail_px}px; height: {thumbnail_px}px; object-fit: contain; image-rendering: auto; }}
figcaption p {{ margin: 0.2em 0; font-size: 0.9em; }}
h2 {{ font-size: 1.1em; margin: 1.2em 0 0.5em; }}
</style></head>
<body><h1>{html.escape(title)}</h1>{body}</body></html>
"""
    atomic_write_text(path, page)
    return path
