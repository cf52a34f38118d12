"""Is the objects' colour and shape in the stage-1 query outputs? A linear probe on the demo's data.

Fits one logistic regression per attribute value (which colours, which shapes appear in the image) on the
frozen features of N training images and reports, on the held-out images, the share whose predicted colour
set / shape set is exactly right. Features: the stage-1 Q-Former's query outputs (what stage 2 bridges to the
LLM), the frozen encoder's tokens after `ln_vision`, and 16x16 pixels as a reference.

    python tools/attribute_probe.py --checkpoint runs/stage1-demo --train 4000
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lavis_lite.checkpoint import CONFIG, resolve_checkpoint
from lavis_lite.data.synthetic import COLOURS, SHAPES
from lavis_lite.data.training_data import TrainingData
from lavis_lite.data.webdataset_pipeline import read_images
from lavis_lite.factory import load_stage1_checkpoint
from stage1.config import load_stage1_config
from stage2.evaluate import named_objects

COLOUR_NAMES = list(COLOURS)


def presence(captions: list[str]) -> torch.Tensor:
    """[N, colours + shapes]: 1 where the caption names that colour / shape."""
    targets = torch.zeros(len(captions), len(COLOUR_NAMES) + len(SHAPES))
    for row, caption in enumerate(captions):
        for colour, shape in named_objects(caption):
            targets[row, COLOUR_NAMES.index(colour)] = 1
            targets[row, len(COLOUR_NAMES) + SHAPES.index(shape)] = 1
    return targets


@torch.no_grad()
def features(model, cache, shards: str, count: int) -> dict[str, torch.Tensor]:
    query_out, tokens = [], []
    for start in range(0, count, 250):
        embeds = model.ln_vision(cache.tokens(range(start, min(count, start + 250))))
        query_out.append(model.image_features(embeds)[0].flatten(1))
        tokens.append(embeds.flatten(1))
    images = read_images(shards, cache.keys[:count])
    pixels = [np.asarray(Image.open(io.BytesIO(images[k])).convert("RGB").resize((16, 16)), np.float32) for k in cache.keys[:count]]
    return {
        "query outputs": torch.cat(query_out),
        "encoder tokens": torch.cat(tokens),
        "pixels 16x16": torch.from_numpy(np.stack(pixels)).flatten(1),
    }


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, l2: float) -> tuple[float, float]:
    """Exact-set accuracy of the colours and of the shapes on the test rows."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-4
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], train_y.shape[1], requires_grad=True)
    bias = torch.zeros(train_y.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(train_x @ weight + bias, train_y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        said, true = (test_x @ weight + bias) > 0, test_y.bool()
    split = len(COLOUR_NAMES)
    colour = (said[:, :split] == true[:, :split]).all(1).float().mean().item()
    shape = (said[:, split:] == true[:, split:]).all(1).float().mean().item()
    return colour, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/stage1-demo", help="stage-1 run directory")
    parser.add_argument("--train", type=int, default=4000, help="training images for the probe")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the probe's weights")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_stage1_checkpoint(args.checkpoint)
    cfg = load_stage1_config(resolve_checkpoint(args.checkpoint) / CONFIG)  # its data, and its encoder's image size
    data = TrainingData(cfg.data, cfg.model.vision, model.vision, None, cfg.model.max_text_len, None)
    train_cache, val_cache = data.cache(cfg.data.train_shards, "train"), data.cache(cfg.data.val_shards, "val")
    train = features(model, train_cache, cfg.data.train_shards, args.train)
    held = features(model, val_cache, cfg.data.val_shards, len(val_cache))
    train_y, held_y = presence(train_cache.captions[: args.train]), presence(val_cache.captions)
    print(f"linear probe, {args.train} training / {len(val_cache)} held-out images: exact colour set, exact shape set")
    for name in train:
        colour, shape = probe(train[name], train_y, held[name], held_y, args.l2)
        print(f"  {name:15s} {100 * colour:5.1f}%  {100 * shape:5.1f}%")


if __name__ == "__main__":
    main()
