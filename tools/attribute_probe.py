"""Where are the objects' colours and shapes, and where are they lost? Linear probes on the demo's data.

Per token: for each colour and shape, one linear score per token (an encoder token or a query output),
max-pooled over the tokens: "is there a red object anywhere", as one query can say it. Fitted with Adam on
the frozen features of N training images. All tokens: a ridge regression from all of an image's tokens at
once (flattened), what a reader of every token together (the LLM) can recover. Both are reported on the
held-out images as the share whose predicted colour set / shape set is exactly right. Each token is
LayerNorm'ed first, as `ln_vision` does. Encoder tokens come from the recipe's feature cache (built once, as
training builds it). With `--checkpoint`, the query outputs of the same Q-Former drawn at random and of its
BERT start without stage 1 are probed beside the trained ones: what stage 1 adds.

    python tools/attribute_probe.py --checkpoint runs/stage1-demo          # its query outputs and its encoder's tokens
    python tools/attribute_probe.py --config configs/stage1/demo.yaml \\
        --variant "model.vision.extra_levels=[]" --variant "model.vision.extra_levels=[2,3]"   # encoders compared
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex

import torch
import torch.nn.functional as F
from torch import Tensor

from lavis_lite.checkpoint import CONFIG, resolve_checkpoint
from lavis_lite.data.training_data import TrainingData
from lavis_lite.demo.synthetic import COLOURS, SHAPES
from lavis_lite.models.factory import create_model, load_stage1_checkpoint
from lavis_lite.models.vision import build_vision_encoder
from lavis_lite.stage1.config import load_stage1_config
from lavis_lite.stage2.evaluate import named_objects

COLOUR_NAMES = list(COLOURS)


def presence(captions: list[str]) -> Tensor:
    """[N, colours + shapes]: 1 where the caption names that colour / shape."""
    targets = torch.zeros(len(captions), len(COLOUR_NAMES) + len(SHAPES))
    for row, caption in enumerate(captions):
        for colour, shape in named_objects(caption):
            targets[row, COLOUR_NAMES.index(colour)] = 1
            targets[row, len(COLOUR_NAMES) + SHAPES.index(shape)] = 1
    return targets


def probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, epochs: int = 60) -> tuple[float, float]:
    """Exact-set accuracy of the colours and of the shapes on the test rows; features [N, tokens, C]."""
    train_x, test_x = (F.layer_norm(x.float(), x.shape[-1:]) for x in (train_x, test_x))
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(train_x.shape[-1], train_y.shape[1])
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), 256):
            rows = order[start : start + 256]
            loss = F.binary_cross_entropy_with_logits(head(train_x[rows]).amax(1), train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        said, true = head(test_x).amax(1) > 0, test_y.bool()
    split = len(COLOUR_NAMES)
    colour = (said[:, :split] == true[:, :split]).all(1).float().mean().item()
    shape = (said[:, split:] == true[:, split:]).all(1).float().mean().item()
    return colour, shape


def _cached_tokens(cfg, encoder, count: int) -> tuple[tuple[Tensor, Tensor], list[str], list[str]]:
    """(first `count` training, all held-out) encoder tokens of a recipe's feature cache, and their captions."""
    data = TrainingData(cfg.data, cfg.model.vision, encoder, None, cfg.model.max_text_len, None)
    train, held = data.cache(cfg.data.train_shards, "train"), data.cache(cfg.data.val_shards, "val")

    def tokens(cache, n: int) -> Tensor:
        return torch.cat([cache.tokens(range(s, min(n, s + 500))) for s in range(0, n, 500)])

    return (tokens(train, count), tokens(held, len(held))), train.captions[:count], held.captions


def ridge_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, ridge: float = 1e-2) -> tuple[float, float]:
    """Exact-set accuracy of the colours and of the shapes from all tokens of an image at once; features
    [N, tokens, C]. `ridge` is relative to the mean feature variance."""
    train_x, test_x = (F.layer_norm(x.float(), x.shape[-1:]).flatten(1).double() for x in (train_x, test_x))
    mean_x, mean_y = train_x.mean(0), train_y.double().mean(0)
    centred, targets = train_x - mean_x, train_y.double() - mean_y
    dims = centred.shape[1]
    penalty = ridge * centred.square().sum() / dims
    if dims <= len(centred):
        weight = torch.linalg.solve(centred.T @ centred + penalty * torch.eye(dims, dtype=centred.dtype), centred.T @ targets)
    else:  # wide features: the same solution from the images' Gram matrix
        gram = centred @ centred.T + penalty * torch.eye(len(centred), dtype=centred.dtype)
        weight = centred.T @ torch.linalg.solve(gram, targets)
    said, true = (test_x - mean_x) @ weight + mean_y > 0.5, test_y.bool()
    split = len(COLOUR_NAMES)
    colour = (said[:, :split] == true[:, :split]).all(1).float().mean().item()
    shape = (said[:, split:] == true[:, split:]).all(1).float().mean().item()
    return colour, shape


@torch.no_grad()
def checkpoint_features(path: str, count: int) -> tuple[dict[str, tuple[Tensor, Tensor]], list[str], list[str]]:
    """(train, held-out) features of a stage-1 run: its encoder's tokens, its query outputs, and the query
    outputs of the same Q-Former drawn at random and (where the recipe starts from BERT) of that start."""
    model, _ = load_stage1_checkpoint(path)
    cfg = load_stage1_config(resolve_checkpoint(path) / CONFIG)
    tokens, train_captions, held_captions = _cached_tokens(cfg, model.vision, count)
    untrained = {"query outputs, random Q-Former": dataclasses.replace(cfg.model.qformer, bert=None)}
    if cfg.model.qformer.bert:
        untrained["query outputs, BERT start, no stage 1"] = cfg.model.qformer
    models = {"query outputs": model}
    for name, qformer in untrained.items():
        torch.manual_seed(0)
        models[name] = create_model(dataclasses.replace(cfg.model, qformer=qformer))[0].eval()
    features = {"encoder tokens": tokens}
    for name, m in models.items():
        features[name] = tuple(
            torch.cat([m.image_features(m.ln_vision(t[s : s + 500]))[0] for s in range(0, len(t), 500)]) for t in tokens
        )
    return features, train_captions, held_captions


@torch.no_grad()
def encoder_features(config: str, overrides: list[str], count: int) -> tuple[tuple[Tensor, Tensor], list[str], list[str]]:
    """(train, held-out) tokens of the frozen encoder a stage-1 recipe with `overrides` builds (cached once)."""
    cfg = load_stage1_config(config, overrides)
    return _cached_tokens(cfg, build_vision_encoder(cfg.model.vision), count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="stage-1 run directory: its encoder tokens and its query outputs")
    source.add_argument("--config", help="stage-1 recipe whose frozen encoder (with each --variant) is probed")
    parser.add_argument("--variant", action="append", default=[], metavar="OVERRIDES",
                        help="with --config: recipe overrides of one encoder variant (repeat to compare)")
    parser.add_argument("--train", type=int, default=4000, help="training images for the probe")
    args = parser.parse_args()
    if args.variant and not args.config:
        parser.error("--variant applies to --config")
    torch.manual_seed(0)
    if args.checkpoint:
        features, train_captions, held_captions = checkpoint_features(args.checkpoint, args.train)
    else:
        features = {}
        for variant in args.variant or [""]:
            features[variant or "(the recipe's encoder)"], train_captions, held_captions = encoder_features(
                args.config, shlex.split(variant), args.train
            )
    train_y, held_y = presence(train_captions), presence(held_captions)
    print(f"linear probes, {args.train} training / {len(held_y)} held-out images: exact colour set, exact shape set")
    print(f"  {'':40s} {'per token (max)':>16s} {'all tokens (ridge)':>19s}")
    for name, (train_x, held_x) in features.items():
        colour, shape = probe(train_x, train_y, held_x, held_y)
        all_colour, all_shape = ridge_probe(train_x, train_y, held_x, held_y)
        print(f"  {name:40s} {100 * colour:6.1f}% {100 * shape:6.1f}%  {100 * all_colour:7.1f}% {100 * all_shape:6.1f}%")


if __name__ == "__main__":
    main()
