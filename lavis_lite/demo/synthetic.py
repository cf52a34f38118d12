"""The embedded default's data: procedurally drawn shapes with compositional captions, as webdataset shards.

Every image shows one object (20%: center, left, right, top, bottom or a corner) or two (left and right,
45%; top and bottom, 35%), each a shape (6 kinds) in a colour (8) and a size (small / large), on a plain,
gradient or noisy grey background. The caption names all four attributes of every object, in one of four
templates per layout (e.g. "a large red circle on the left and a small blue square on the right", "a small
green star above a large white cross", "there is a small black diamond in the top left corner"), so
retrieving the right image from a caption needs colour, shape, size and position. Horizontal positions are
worded only with "left" / "right", so a flip that swaps those two words keeps captions true.

Each sample is drawn from its own seed stream (seed, split, index): shards can be written in parallel and
in any order, and train and val never share a stream.

    python -m lavis_lite.demo.synthetic --out data/synthetic --train 20000 --val 1000 --image-size 128 --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from lavis_lite.io import atomic_path, atomic_write_text

GENERATOR_VERSION = 1
SPLITS = {"train": 0, "val": 1}  # the split's number in the seed stream

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (220, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (245, 220, 30),
    "green": (35, 160, 55),
    "blue": (35, 75, 225),
    "purple": (140, 45, 185),
    "white": (248, 248, 248),
    "black": (15, 15, 15),
}
SIZES = {"small": (0.075, 0.105), "large": (0.16, 0.2)}  # circumradius range, fraction of the image side
# Object centres (x, y as fractions) and the jitter of each coordinate.
SINGLE_POSITIONS = {
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
SINGLE_JITTER = 0.03
PAIR_LAYOUTS = {"left_right": ("left", "right"), "top_bottom": ("top", "bottom")}
PAIR_OFFSET, PAIR_JITTER = 0.24, (0.02, 0.12)  # along / across the layout's axis
LAYOUT_WEIGHTS = {"single": 0.2, "left_right": 0.45, "top_bottom": 0.35}
BACKGROUNDS = ("plain", "gradient", "noise")

WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
    **{f"{v} {h}": f"in the {v} {h} corner" for v in ("top", "bottom") for h in ("left", "right")},
}
# {a} / {b}: "size colour shape" of the first / second object (left or top first); {pa} / {pb}: WHERE phrases.
SINGLE_TEMPLATES = ("a {a} {pa}", "there is a {a} {pa}", "an image of a {a} {pa}", "a picture with a {a} {pa}")
PAIR_TEMPLATES = {
    "left_right": (
        "a {a} {pa} and a {b} {pb}",
        "a {b} {pb} and a {a} {pa}",
        "a {a} to the left of a {b}",
        "a {b} to the right of a {a}",
    ),
    "top_bottom": ("a {a} {pa} and a {b} {pb}", "a {b} {pb} and a {a} {pa}", "a {a} above a {b}", "a {b} below a {a}"),
}

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator) -> dict[str, Any]:
    """A random scene: its layout, objects (shape, colour, size, position, centre, radius) and background."""
    cumulative = np.cumsum(list(LAYOUT_WEIGHTS.values()))
    layout = list(LAYOUT_WEIGHTS)[int(np.searchsorted(cumulative, rng.random(), side="right"))]
    if layout == "single":
        position = _choice(rng, list(SINGLE_POSITIONS))
        x, y = SINGLE_POSITIONS[position]
        slots = [(position, x + rng.uniform(-1, 1) * SINGLE_JITTER, y + rng.uniform(-1, 1) * SINGLE_JITTER)]
    else:
        across = 0.5 + rng.uniform(-1, 1, size=2) * PAIR_JITTER[1]
        along = 0.5 + np.array([-PAIR_OFFSET, PAIR_OFFSET]) + rng.uniform(-1, 1, size=2) * PAIR_JITTER[0]
        xs, ys = (along, across) if layout == "left_right" else (across, along)
        slots = [(p, xs[i], ys[i]) for i, p in enumerate(PAIR_LAYOUTS[layout])]
    objects = []
    for position, x, y in slots:
        size = _choice(rng, list(SIZES))
        objects.append(
            {
                "shape": _choice(rng, SHAPES),
                "colour": _choice(rng, list(COLOURS)),
                "size": size,
                "position": position,
                "center": [round(float(x), 4), round(float(y), 4)],
                "radius": round(float(rng.uniform(*SIZES[size])), 4),
            }
        )
    grey = rng.uniform(95, 165)
    tint = rng.uniform(-12, 12, size=3)
    background = {"texture": _choice(rng, BACKGROUNDS), "colour": [int(grey + t) for t in tint]}
    return {"layout": layout, "objects": objects, "background": background}


def caption_scene(scene: dict[str, Any], template: int) -> str:
    """The caption of a scene in one of its layout's templates."""
    phrases = [f"{o['size']} {o['colour']} {o['shape']}" for o in scene["objects"]]
    where = [WHERE[o["position"]] for o in scene["objects"]]
    if scene["layout"] == "single":
        return SINGLE_TEMPLATES[template].format(a=phrases[0], pa=where[0])
    return PAIR_TEMPLATES[scene["layout"]][template].format(a=phrases[0], b=phrases[1], pa=where[0], pb=where[1])


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a shape with circumradius r (the square is inscribed, the diamond is a square on its tip)."""
    if shape == "square":
        h = r / math.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "triangle":
        return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "star":
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [(cx + d * math.sin(k * math.pi / 5), cy - d * math.cos(k * math.pi / 5)) for k, d in enumerate(radii)]
    if shape == "cross":
        w = 0.32 * r
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: dict[str, Any], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene as an RGB image: background, then each object as an anti-aliased solid shape."""
    s = image_size
    base = np.array(scene["background"]["colour"], dtype=np.float32)
    texture = scene["background"]["texture"]
    if texture == "plain":
        image = Image.new("RGB", (s, s), tuple(scene["background"]["colour"]))
    else:
        if texture == "gradient":
            ramp = np.linspace(-1, 1, s, dtype=np.float32) * rng.uniform(10, 25)
            pixels = base + (ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None])
        else:
            pixels = base + 7 * rng.standard_normal(size=(s, s, 1), dtype=np.float32)
        image = Image.fromarray(np.clip(np.broadcast_to(pixels, (s, s, 3)), 0, 255).astype(np.uint8))
    for obj in scene["objects"]:
        # Draw into a mask around the object only, at SUPERSAMPLE x, then box-filter it down.
        r = obj["radius"] * s
        x0, y0 = int(obj["center"][0] * s - r) - 1, int(obj["center"][1] * s - r) - 1
        side = int(2 * r) + 3
        cx, cy = (obj["center"][0] * s - x0) * SUPERSAMPLE, (obj["center"][1] * s - y0) * SUPERSAMPLE
        mask = Image.new("L", (side * SUPERSAMPLE, side * SUPERSAMPLE), 0)
        draw = ImageDraw.Draw(mask)
        if obj["shape"] == "circle":
            big_r = r * SUPERSAMPLE
            draw.ellipse([cx - big_r, cy - big_r, cx + big_r, cy + big_r], fill=255)
        else:
            draw.polygon(_polygon(obj["shape"], cx, cy, r * SUPERSAMPLE), fill=255)
        jitter = rng.integers(-8, 9, size=3)
        colour = tuple(min(255, max(0, c + int(d))) for c, d in zip(COLOURS[obj["colour"]], jitter, strict=True))
        image.paste(colour, (x0, y0, x0 + side, y0 + side), mask=mask.reduce(SUPERSAMPLE))
    return image


def make_example(seed: int, split: str, index: int, image_size: int, quality: int = 90) -> tuple[bytes, str, dict]:
    """Sample `index` of a split: JPEG bytes, caption and the json metadata (attributes, template)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    scene = sample_scene(rng)
    templates = SINGLE_TEMPLATES if scene["layout"] == "single" else PAIR_TEMPLATES[scene["layout"]]
    template = int(rng.integers(len(templates)))
    caption = caption_scene(scene, template)
    buffer = io.BytesIO()
    render_scene(scene, image_size, rng).save(buffer, format="JPEG", quality=quality)
    meta = {"caption": caption, "template": template, **scene}
    return buffer.getvalue(), caption, meta


def scene_signature(meta: dict) -> tuple:
    """What a scene shows, up to jitter and wording: scenes with equal signatures fit each other's captions."""
    return (meta["layout"],) + tuple((o["size"], o["colour"], o["shape"], o["position"]) for o in meta["objects"])


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata (mtime 0, no owner): equal inputs give equal bytes
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardTask(NamedTuple):
    """Samples [start, start + count) of a split, to be written to `path`."""

    path: Path
    seed: int
    split: str
    start: int
    count: int
    image_size: int
    quality: int


def write_shard(task: ShardTask) -> list[tuple[str, tuple]]:
    """Write a shard (to a temp name, renamed when complete); return each sample's caption and scene signature."""
    summary = []
    with atomic_path(task.path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(task.start, task.start + task.count):
            jpeg, caption, meta = make_example(task.seed, task.split, index, task.image_size, task.quality)
            key = f"{task.split}_{index:07d}"
            _add_file(tar, f"{key}.jpg", jpeg)
            _add_file(tar, f"{key}.txt", caption.encode())
            _add_file(tar, f"{key}.json", json.dumps({"key": key, **meta}, sort_keys=True).encode())
            summary.append((caption, scene_signature(meta)))
    return summary


def duplication_stats(summary: Sequence[tuple[str, tuple]]) -> dict[str, Any]:
    """How distinguishable a split's images are by caption: distinct captions / scenes, and the fraction
    of images whose caption (or scene) another image shares; such images cap strict text-to-image R@1."""
    captions = Counter(c for c, _ in summary)
    scenes = Counter(s for _, s in summary)
    n = max(len(summary), 1)
    return {
        "images": len(summary),
        "distinct_captions": len(captions),
        "images_sharing_caption": round(sum(k for k in captions.values() if k > 1) / n, 4),
        "distinct_scenes": len(scenes),
        "images_sharing_scene": round(sum(k for k in scenes.values() if k > 1) / n, 4),
    }


def _complete_manifest(out: Path, params: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The manifest in `out` if it records `params` and all its shards exist."""
    path = out / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    shards = [out / name for split in manifest.get("splits", {}).values() for name in split["shards"]]
    return manifest if manifest.get("params") == params and all(p.is_file() for p in shards) else None


def generate(
    out: str | Path,
    train: int = 20000,
    val: int = 1000,
    image_size: int = 128,
    seed: int = 0,
    shard_size: int = 1000,
    quality: int = 90,
    workers: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `out/train/shard-*.tar`, `out/val/shard-*.tar` and `out/manifest.json`; return the manifest.

    Does nothing when `out/manifest.json` already records the same parameters and its shards exist. The
    manifest is written last, so a directory without one is incomplete.
    """
    out = Path(out)
    counts = {"train": train, "val": val}
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "quality": quality,
        "shard_size": shard_size,
        "counts": counts,
    }
    manifest = _complete_manifest(out, params)
    if manifest is not None:
        return manifest
    (out / "manifest.json").unlink(missing_ok=True)
    tasks, shard_names = [], {}
    for split, count in counts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        starts = range(0, count, shard_size)
        shard_names[split] = [f"{split}/shard-{i:06d}.tar" for i in range(len(starts))]
        for old in (out / split).glob("shard-*.tar"):
            if f"{split}/{old.name}" not in shard_names[split]:
                old.unlink()  # from a larger earlier run: a directory listing would pick it up
        for name, start in zip(shard_names[split], starts, strict=True):
            tasks.append(ShardTask(out / name, seed, split, start, min(shard_size, count - start), image_size, quality))
    processes = min(workers or os.cpu_count() or 1, len(tasks))
    summaries: dict[Path, list] = {}
    with tqdm(total=train + val, unit="img", desc=f"synthetic -> {out}", disable=not progress) as bar:
        if processes > 1:
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                for task, summary in zip(tasks, pool.imap(write_shard, tasks), strict=True):
                    summaries[task.path] = summary
                    bar.update(task.count)
        else:
            for task in tasks:
                summaries[task.path] = write_shard(task)
                bar.update(task.count)
    manifest = {
        "params": params,
        "splits": {split: {"count": counts[split], "shards": names} for split, names in shard_names.items()},
        "val_stats": duplication_stats([s for name in shard_names["val"] for s in summaries[out / name]]),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lavis_lite.demo.synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=20000, help="training images (default 20000)")
    parser.add_argument("--val", type=int, default=1000, help="held-out images (default 1000)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    args = parser.parse_args(argv)
    manifest = generate(
        args.out, args.train, args.val, args.image_size, args.seed, args.shard_size, args.quality, args.workers
    )
    print(json.dumps({"out": args.out, **manifest["params"]["counts"], "val_stats": manifest["val_stats"]}))


if __name__ == "__main__":
    main()
