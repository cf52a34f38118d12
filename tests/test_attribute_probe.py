"""tools/attribute_probe.py: the linear probes behind the bootstrapping account (what the query outputs hold)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.attribute_probe import COLOUR_NAMES, presence, ridge_probe  # noqa: E402

from lavis_lite.demo.synthetic import SHAPES  # noqa: E402


def _scenes(n: int, generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
    """Captions naming two random objects, and the presence targets they give."""
    colours = torch.randint(len(COLOUR_NAMES), (n, 2), generator=generator)
    shapes = torch.randint(len(SHAPES), (n, 2), generator=generator)
    captions = [
        f"a small {COLOUR_NAMES[c[0]]} {SHAPES[s[0]]} on the left and a large {COLOUR_NAMES[c[1]]} {SHAPES[s[1]]} on the right"
        for c, s in zip(colours.tolist(), shapes.tolist())
    ]
    return captions, presence(captions)


def test_ridge_probe_reads_attributes_spread_over_tokens_and_not_noise():
    """Presence mixed at random into every token (no token says it alone) is read back by the all-token probe;
    features unrelated to the captions are not; the wide (Gram-matrix) form gives the narrow form's answer."""
    generator = torch.Generator().manual_seed(0)
    _, train_y = _scenes(1500, generator)
    _, test_y = _scenes(500, generator)
    mixing = torch.randn(train_y.shape[1], 3, 32, generator=generator)  # each attribute spread over 3 tokens

    def features(y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("na,atc->ntc", y, mixing) + 0.05 * torch.randn(len(y), 3, 32, generator=generator)

    colour, shape = ridge_probe(features(train_y), train_y, features(test_y), test_y)
    assert colour > 0.95 and shape > 0.95
    noise_colour, noise_shape = ridge_probe(torch.randn(1500, 3, 32), train_y, torch.randn(500, 3, 32), test_y)
    assert noise_colour < 0.2 and noise_shape < 0.2
    wide_train, wide_test = features(train_y[:60]), features(test_y)  # 96 features > 60 images: the wide form
    narrow = torch.cat([wide_train] * 2)  # the same images twice: 120 rows >= 96, the narrow form
    wide, twice = ridge_probe(wide_train, train_y[:60], wide_test, test_y), ridge_probe(narrow, torch.cat([train_y[:60]] * 2), wide_test, test_y)
    assert wide == twice
