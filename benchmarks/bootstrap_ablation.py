"""BLIP-2's bootstrapping ablation on the embedded default: does stage 1 give stage 2 a head start?

The paper (section 5, "effect of vision-language representation learning") trains stage 2 with and without
stage 1 first and finds generation far worse without it. Here, with the demo recipes and nothing else changed:

  stage 1 (ITC + ITM + ITG)   -> stage 2     the demo
  no stage 1, random Q-Former -> stage 2     every weight drawn at random
  no stage 1, MiniLM Q-Former -> stage 2     the paper's "without representation learning": stage 1's start
                                             (MiniLM's BERT weights as the recipe scales them) without stage 1
  stage 1 without ITG         -> stage 2     ITG's share of the head start (the recipe's stage-2 setting only)
  stage 1 from MiniLM, self-attention at full weight -> stage 2
                                             the queries merge in the first steps and, for most seeds, stay so
  random Q-Former -> stage 1  -> stage 2     stage 1 without BERT weights: the same init with and without stage 1

Every stage-2 run is the demo recipe with the same number of steps. Every arm but the one without ITG gets its
own best Q-Former-side schedule from a small sweep (`--sweep`: `recipe` is the recipe's own per-module schedule;
`SCALE@START` sets `train.optim.lr_scale` of the whole Q-Former side to SCALE times the stage-2 lr and
`train.optim.start_step` to START; a suffix `:L` sets the Linear's weight to L times the stage-2 lr instead of
the recipe's scale, e.g. `recipe:1`). A seed is a whole pipeline: with `--seeds r 1 2` each arm's stage 1 runs
three times (`train.seed`, `data.seed`) and each stage-2 setting once from each of them with the same seed
(settings other than `recipe` on `--sweep-seeds` only). An arm's best setting is the one with the highest mean on
`--sweep-seeds`, the same seeds for every setting; it then runs on every seed and shows in bold. The table shows
every setting and its mean over its seeds. Retrieval R@1/R@5 (mean over the seeds) and the within-image query
cosine (per seed) are the stage-1 models'; caption metrics are stage 2's, all on the held-out split.

    .venv/bin/python benchmarks/bootstrap_ablation.py [--out runs/ablation] [--sweep recipe 0.05@0 0.2@0]
        [--eval-images N] [--stage2-steps N] [--seeds r 1 2 ...] [--sweep-seeds r ...] [--arms stage1 random ...]
        [--set KEY=VALUE ...] [--stage1-set KEY=VALUE ...] [--stage2-set KEY=VALUE ...]

Each run lands in its own directory under `--out`; a run whose metrics.json exists is reused, so an
interrupted ablation continues where it stopped. Writes `--out`/ablation.md and ablation.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lavis_lite.checkpoint import CONFIG, checkpoints, resolve_checkpoint
from lavis_lite.training.train_loop import in_module

ROOT = Path(__file__).resolve().parents[1]
STAGE1_RECIPE = "configs/stage1/demo.yaml"
STAGE2_RECIPE = "configs/stage2/demo.yaml"
STAGE1_PARTS = ("qformer", "query_tokens", "ln_vision")
RECIPE = "recipe"  # the sweep setting that keeps the recipe's own lr_scale / start_step
LINEAR_WEIGHT = "language_projection.weight"


@dataclass
class Arm:
    key: str  # its name on the command line (--arms)
    name: str
    stage1: list[str] | None  # stage-1 overrides; None: no stage 1
    stage2: list[str] = field(default_factory=list)  # stage-2 overrides that say where the Q-Former starts
    swept: bool = True  # False: the recipe's stage-2 setting only


def recipe_bert_start() -> list[str]:
    """The stage-1 recipe's BERT start as overrides, for a Q-Former that skips stage 1 but starts where it does."""
    qformer = OmegaConf.load(ROOT / STAGE1_RECIPE).model.qformer
    return [f"model.qformer.{key}={qformer[key]}" for key in ("bert", "bert_self_attention_scale")]


ARMS = (
    Arm("stage1", "stage 1 (ITC+ITM+ITG)", []),
    Arm("random", "no stage 1, random Q-Former", None, ["model.stage1_checkpoint=null", "model.qformer.bert=null"]),
    Arm("minilm", "no stage 1, MiniLM Q-Former", None, ["model.stage1_checkpoint=null", *recipe_bert_start()]),
    Arm("no-itg", "stage 1 without ITG", ["model.losses=[itc,itm]"], swept=False),
    Arm("stage1-full-attention", "stage 1 from MiniLM, self-attention at full weight",
        ["model.qformer.bert_self_attention_scale=1.0"]),
    Arm("stage1-random", "stage 1 from a random Q-Former",
        ["model.qformer.bert=null", "model.qformer.tokenizer=weights/all-MiniLM-L6-v2"]),
)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


@dataclass(frozen=True)
class Setting:
    """A stage-2 sweep setting: the Q-Former side's schedule and, if given, the Linear's weight lr scale."""

    schedule: str | tuple[float, int]  # RECIPE, or (lr scale of the Q-Former side, its start step)
    linear: float | None = None  # None: the recipe's

    @property
    def label(self) -> str:
        label = RECIPE if self.schedule == RECIPE else "{:g}@{}".format(*self.schedule)
        return label if self.linear is None else f"{label}:{self.linear:g}"


def parse_setting(text: str) -> Setting:
    """`recipe` or `SCALE@START` (or `SCALE`, START 0), each optionally `:L` (the Linear's weight at L x lr)."""
    schedule, _, linear = text.partition(":")
    scale, _, start = schedule.partition("@")
    try:
        return Setting(RECIPE if schedule == RECIPE else (float(scale), int(start or 0)), float(linear) if linear else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad sweep setting {text!r}: write {RECIPE} or SCALE@START, e.g. 0.05@150, "
                                         f"optionally with :L, e.g. {RECIPE}:1") from None


def parse_seed(text: str) -> int | None:
    """`r` (the recipe's own seeds: None) or an integer."""
    if text == "r":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad seed {text!r}: write r (the recipe's) or an integer") from None


def setting_overrides(setting: Setting) -> list[str]:
    """The stage-2 overrides of a sweep setting; `recipe` spells out the recipe's own schedule, so that a reused
    run is checked against it too. `SCALE@START` keeps the recipe's entries outside the Q-Former side (the Linear's)."""
    optim = OmegaConf.load(ROOT / STAGE2_RECIPE).train.optim
    schedule = {key: plain(optim.get(key, {})) for key in ("lr_scale", "start_step")}
    if setting.schedule != RECIPE:
        scale, start = setting.schedule
        schedule = {key: {k: v for k, v in value.items() if not any(in_module(k, part) for part in STAGE1_PARTS)}
                    for key, value in schedule.items()}
        schedule["lr_scale"].update(dict.fromkeys(STAGE1_PARTS, scale))
        schedule["start_step"].update(dict.fromkeys(STAGE1_PARTS, start) if start else {})
    if setting.linear is not None:
        schedule["lr_scale"][LINEAR_WEIGHT] = setting.linear
    return [f"train.optim.{key}={{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}" for key, value in schedule.items()]


def plain(value: object) -> object:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


PLACES = ("train.output_dir", "model.stage1_checkpoint", "model.llm.cache_dir")  # may differ in a reused run


def leaves(node: object, prefix: str = "") -> dict[str, object]:
    """A plain mapping's dotted keys and their values (lists, and mappings keyed by dotted module names such as
    `lr_scale`, are values)."""
    if not isinstance(node, dict) or not node or any("." in str(key) for key in node):
        return {prefix: node}
    return {k: v for key, child in node.items() for k, v in leaves(child, f"{prefix}{key}.").items()}


def wanted_settings(recipe: str, overrides: list[str]) -> dict[str, object]:
    """Every setting a run of `recipe` with `overrides` has: the overrides, and the recipe's keys they leave."""
    given = {}
    for override in overrides:
        key = override.split("=", 1)[0]
        given[key] = plain(OmegaConf.select(OmegaConf.from_dotlist([override]), key))
    recipe_keys = {key.rstrip("."): value for key, value in leaves(plain(OmegaConf.load(ROOT / recipe))).items()}
    kept = {key: value for key, value in recipe_keys.items() if not any(key == k or key.startswith(k + ".") for k in given)}
    return {**kept, **given}


def run(module: str, recipe: str, output_dir: Path, overrides: list[str]) -> dict:
    """One training run (or its earlier result, which must have been run with the same settings: the recipe's as
    it is now and the overrides); returns its metrics.json. Where the stage-1 checkpoint and the LLM cache live
    may differ."""
    metrics = output_dir / "metrics.json"
    if metrics.is_file():
        saved = OmegaConf.load(resolve_checkpoint(output_dir) / CONFIG)
        for key, wanted in wanted_settings(recipe, overrides).items():
            had = plain(OmegaConf.select(saved, key))
            if key in PLACES and (had is None) == (wanted is None):
                continue
            if had != wanted and not (had is None and wanted == {}):  # a mapping option newer than the run: {}
                sys.exit(f"error: {output_dir} was run with {key}={had}, not {wanted}: move it away or give another --out")
    else:
        command = [sys.executable, "-m", module, "--config", recipe, f"train.output_dir={output_dir}", *overrides]
        command += ["--resume"] if checkpoints(output_dir) else []  # a run killed before its metrics continues
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return json.loads(metrics.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument("--sweep", type=parse_setting, nargs="+", default=[parse_setting(s) for s in (RECIPE, "0.05@0", "0.2@0")],
                        help=f"stage-2 settings: {RECIPE} or SCALE@START, each optionally :L for the Linear's weight "
                             f"(default {RECIPE} 0.05@0 0.2@0)")
    parser.add_argument("--stage2-steps", type=int, default=None, help="default: the stage-2 recipe's train.steps")
    parser.add_argument("--eval-images", type=int, default=0, help="held-out images captioned (0: all)")
    parser.add_argument("--seeds", type=parse_seed, nargs="+", default=[None],
                        help="seeds (train.seed and data.seed of both stages), r for the recipes' own: each arm's "
                             "stage 1 and each stage-2 setting run once per seed; the table shows their mean (default: r)")
    parser.add_argument("--sweep-seeds", type=parse_seed, nargs="+", default=None,
                        help="the seeds of the sweep's settings other than recipe (default: --seeds), e.g. r")
    parser.add_argument("--arms", nargs="+", choices=[arm.key for arm in ARMS], default=[arm.key for arm in ARMS],
                        help="the arms to run (default: all)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every stage-1 and stage-2 run, e.g. \"model.vision.extra_levels=[]\" "
                             "(give each variant its own --out)")
    parser.add_argument("--stage1-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for the stage-1 runs only, e.g. train.optim.lr=1e-4")
    parser.add_argument("--stage2-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for the stage-2 runs only, e.g. model.projection_init=mean_token")
    args = parser.parse_args()
    if args.sweep_seeds is None:
        args.sweep_seeds = args.seeds
    elif not set(args.sweep_seeds) <= set(args.seeds):
        parser.error("--sweep-seeds must be seeds of --seeds: the sweep's stage-2 runs start from their stage-1 runs")
    out = args.out.resolve()
    common = [*args.set, *args.stage2_set, f"eval.max_images={args.eval_images}", f"model.llm.cache_dir={out / 'llm'}"]
    if args.stage2_steps:
        common.append(f"train.steps={args.stage2_steps}")
    rows = []
    for arm in (arm for arm in ARMS if arm.key in args.arms):
        stage1_runs, stage1_dirs = [], {}
        for seed in args.seeds if arm.stage1 is not None else []:
            stage1_dirs[seed] = out / (f"stage1-{slug(arm.name)}" + seed_suffix(seed))
            stage1_runs.append(run("stage1.train", STAGE1_RECIPE, stage1_dirs[seed],
                                   [*arm.stage1, *seed_overrides(seed), *args.set, *args.stage1_set]))
        def stage2(setting: Setting, seed: int | None) -> dict:
            start = arm.stage2 if arm.stage1 is None else [f"model.stage1_checkpoint={stage1_dirs[seed]}"]
            stage2_dir = out / (f"stage2-{slug(arm.name)}-{slug(setting.label)}" + seed_suffix(seed))
            return run("stage2.train", STAGE2_RECIPE, stage2_dir,
                       [*start, *setting_overrides(setting), *seed_overrides(seed), *common])

        arm_rows = []
        for setting in args.sweep if arm.swept else [Setting(RECIPE)]:
            seeds = args.seeds if setting == Setting(RECIPE) else args.sweep_seeds
            arm_rows.append({"setting": setting, "runs": {seed: stage2(setting, seed) for seed in seeds}})
        # The best setting is chosen on the sweep's seeds alone (the same seeds for every setting), then run on all.
        best = max(arm_rows, key=lambda row: mean_metrics([row["runs"][s] for s in args.sweep_seeds])["caption_attr_acc"])
        best["runs"].update({seed: stage2(best["setting"], seed) for seed in args.seeds if seed not in best["runs"]})
        for row in arm_rows:
            runs = [row["runs"][seed] for seed in args.seeds if seed in row["runs"]]
            rows.append({"arm": arm.name, "qformer_schedule": row["setting"].label, "best": row is best,
                         "stage1": mean_metrics(stage1_runs), "stage1_runs": stage1_runs,
                         "stage2": mean_metrics(runs), "stage2_runs": runs})
    table = render(rows)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)


def seed_suffix(seed: int | None) -> str:
    return "" if seed is None else f"-seed{seed}"


def seed_overrides(seed: int | None) -> list[str]:
    return [] if seed is None else [f"train.seed={seed}", f"data.seed={seed}"]


def mean_metrics(runs: list[dict]) -> dict:
    """A stage's metrics averaged over seeds (the numeric ones; {} for no runs)."""
    if not runs:
        return {}
    return {key: sum(r[key] for r in runs) / len(runs) for key, value in runs[0].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def render(rows: list[dict]) -> str:
    """One markdown table; each arm's best setting (chosen on the sweep's seeds) in bold."""
    lines = [
        "| start of stage 2 | Q-Former lr (x stage-2 lr) @ start step[:Linear weight lr] | attribute accuracy | per seed | colours | shapes "
        "| held-out caption loss | stage-1 R@1 t2i / i2t | stage-1 R@5 t2i / i2t | query cosine after stage 1 (per seed) / stage 2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        s1, s2 = row["stage1"], row["stage2"]
        mark = "**" if row["best"] else ""
        retrieval = [f"{100 * s1[f't2i_r{k}']:.1f} / {100 * s1[f'i2t_r{k}']:.1f}" if s1 else "-" for k in (1, 5)]
        cosine = (", ".join(f"{r['query_cosine']:.3f}" for r in row["stage1_runs"]) if s1 else "-") + f" / {s2['query_cosine']:.3f}"
        seeds = " / ".join(f"{100 * r['caption_attr_acc']:.1f}" for r in row["stage2_runs"])
        lines.append(
            f"| {row['arm']} | {row['qformer_schedule']} "
            f"| {mark}{100 * s2['caption_attr_acc']:.1f}%{mark} | {seeds} | {100 * s2['caption_colour_acc']:.1f}% "
            f"| {100 * s2['caption_shape_acc']:.1f}% | {s2['caption_loss']:.3f} | {retrieval[0]} | {retrieval[1]} | {cosine} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
