"""Pictures of a run: the loss curves from `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

from lavis_lite.io import atomic_path

LOSS_KEYS = ("loss", "itc", "itm", "itg", "lm")


def plot_loss_curve(history: Path, out: Path) -> None:
    """Render every loss logged in `history` (JSON lines with a `step`) to a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(history).read_text().splitlines() if line.strip()]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key in LOSS_KEYS:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, linewidth=2 if key == "loss" else 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(Path(history).parent.name)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
