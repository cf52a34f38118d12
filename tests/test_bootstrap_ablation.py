"""The bootstrapping ablation's bookkeeping: sweep settings, the recipe's own schedule, seed means, the table."""

import importlib.util
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bootstrap_ablation", ROOT / "benchmarks" / "bootstrap_ablation.py")
ablation = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))  # dataclasses look it up there
spec.loader.exec_module(ablation)


def test_recipe_setting_spells_out_the_recipes_schedule():
    """`recipe` sends the stage-2 recipe's own lr_scale / start_step, so a reused run is checked against them."""
    overrides = OmegaConf.from_dotlist(ablation.setting_overrides(ablation.parse_setting("recipe")))
    recipe = OmegaConf.load(ROOT / ablation.STAGE2_RECIPE)
    assert overrides.train.optim.lr_scale == recipe.train.optim.lr_scale
    assert overrides.train.optim.start_step == recipe.train.optim.start_step
    outside = {k: v for k, v in recipe.train.optim.lr_scale.items() if not k.startswith(ablation.STAGE1_PARTS)}
    assert outside, "the recipe scales the Linear's weight: SCALE@START must keep it"
    uniform = OmegaConf.from_dotlist(ablation.setting_overrides(ablation.parse_setting("0.2@0")))
    assert dict(uniform.train.optim.lr_scale) == {**outside, **dict.fromkeys(ablation.STAGE1_PARTS, 0.2)}
    assert dict(uniform.train.optim.start_step) == {}
    late = OmegaConf.from_dotlist(ablation.setting_overrides(ablation.parse_setting("0.05@150:1")))
    assert dict(late.train.optim.lr_scale) == {**outside, **dict.fromkeys(ablation.STAGE1_PARTS, 0.05), ablation.LINEAR_WEIGHT: 1.0}
    assert dict(late.train.optim.start_step) == dict.fromkeys(ablation.STAGE1_PARTS, 150)
    fast_linear = OmegaConf.from_dotlist(ablation.setting_overrides(ablation.parse_setting("recipe:1")))
    assert dict(fast_linear.train.optim.lr_scale) == {**recipe.train.optim.lr_scale, ablation.LINEAR_WEIGHT: 1.0}
    assert [ablation.parse_setting(t).label for t in ("recipe", "0.2@0", "recipe:1", "0.05@150:0.5")] == [
        "recipe", "0.2@0", "recipe:1", "0.05@150:0.5"]
    for bad in ("fast", "recipe:fast"):
        with pytest.raises(Exception, match="bad sweep setting"):
            ablation.parse_setting(bad)
    assert [ablation.parse_seed(t) for t in ("r", "1")] == [None, 1]
    with pytest.raises(Exception, match="bad seed"):
        ablation.parse_seed("one")


def test_table_shows_seed_means_and_the_best_setting_in_bold():
    def metrics(acc):
        return {"caption_attr_acc": acc, "caption_colour_acc": acc, "caption_shape_acc": acc, "caption_loss": 1 - acc,
                "query_cosine": 0.5, "caption_examples": []}

    stage1 = {"t2i_r1": 0.8, "i2t_r1": 0.9, "t2i_r5": 1.0, "i2t_r5": 1.0, "query_cosine": 0.75}
    rows = []
    for label, accs, best in (("recipe", [0.4, 0.6], False), ("0.2@0", [0.7, 0.1], True)):
        runs = [metrics(a) for a in accs]
        rows.append({"arm": "stage 1", "qformer_schedule": label, "best": best, "stage1": stage1, "stage1_runs": [stage1, stage1],
                     "stage2": ablation.mean_metrics(runs), "stage2_runs": runs})
    assert rows[0]["stage2"]["caption_attr_acc"] == pytest.approx(0.5) and "caption_examples" not in rows[0]["stage2"]
    lines = ablation.render(rows).splitlines()
    assert "| stage 1 | recipe | 50.0% | 40.0 / 60.0 |" in lines[2]
    assert "| stage 1 | 0.2@0 | **40.0%** | 70.0 / 10.0 |" in lines[3], "the setting main chose, bold"
    assert "80.0 / 90.0" in lines[2]
    assert lines[2].endswith("| 0.750, 0.750 / 0.500 |"), "each stage-1 seed's query cosine, then stage 2's mean"


def record_runs(monkeypatch) -> list[tuple[str, str, list[str]]]:
    """Replaces the ablation's runs with a recorder of (module, run directory name, overrides)."""
    calls = []

    def fake_run(module, recipe, output_dir, overrides):
        calls.append((module, output_dir.name, overrides))
        return {"caption_attr_acc": 0.5, "caption_colour_acc": 0.5, "caption_shape_acc": 0.5, "caption_loss": 0.5,
                "query_cosine": 0.5, "t2i_r1": 0.8, "i2t_r1": 0.8, "t2i_r5": 1.0, "i2t_r5": 1.0}

    monkeypatch.setattr(ablation, "run", fake_run)
    return calls


def test_arms_and_set_choose_the_runs_and_reach_both_stages(tmp_path, monkeypatch):
    """`--arms` runs only the arms named; `--set` overrides reach every stage-1 and stage-2 run, `--stage1-set`
    overrides the stage-1 runs alone."""
    calls = record_runs(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["bootstrap_ablation.py", "--out", str(tmp_path), "--arms", "stage1", "random",
                                      "--sweep", "recipe", "0.2@0", "--set", "model.vision.extra_levels=[]",
                                      "--stage1-set", "train.optim.lr=1e-4"])
    ablation.main()
    modules = [module for module, _, _ in calls]
    assert modules == ["stage1.train"] + ["stage2.train"] * 4, "one stage 1, two settings for each of two arms"
    assert all("model.vision.extra_levels=[]" in overrides for _, _, overrides in calls)
    assert ["train.optim.lr=1e-4" in overrides for _, _, overrides in calls] == [True] + [False] * 4
    assert not any("minilm" in name or "without" in name for _, name, _ in calls)
    table = (tmp_path / "ablation.md").read_text()
    assert "random Q-Former" in table and "MiniLM" not in table


def test_stage1_variants_and_the_minilm_arm_start_where_they_say(tmp_path, monkeypatch):
    """`stage1-full-attention` runs stage 1 from BERT's self-attention as it is and `stage1-random` from no BERT
    weights, each stage 2 from its own stage-1 run; `minilm` starts stage 2 from the stage-1 recipe's BERT start."""
    calls = record_runs(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["bootstrap_ablation.py", "--out", str(tmp_path), "--arms", "stage1-full-attention",
                                      "stage1-random", "minilm", "--sweep", "0.2@0"])
    ablation.main()
    (_, _, minilm), (_, _, full), (_, _, full2), (_, _, random), (_, _, random2) = calls  # in the order of ARMS
    out = tmp_path.resolve()
    assert "model.qformer.bert_self_attention_scale=1.0" in full
    assert f"model.stage1_checkpoint={out / 'stage1-stage-1-from-minilm-self-attention-at-full-weight'}" in full2
    assert "model.qformer.bert=null" in random and "model.qformer.tokenizer=weights/all-MiniLM-L6-v2" in random
    assert f"model.stage1_checkpoint={out / 'stage1-stage-1-from-a-random-q-former'}" in random2
    assert not any("qformer.bert" in o for o in full2 + random2), "stage 2 takes its Q-Former from stage 1"
    recipe = OmegaConf.load(ROOT / ablation.STAGE1_RECIPE).model.qformer
    assert f"model.qformer.bert={recipe.bert}" in minilm and "model.stage1_checkpoint=null" in minilm
    assert f"model.qformer.bert_self_attention_scale={recipe.bert_self_attention_scale}" in minilm


def test_a_seed_is_a_whole_pipeline(tmp_path, monkeypatch):
    """With --seeds each arm's stage 1 runs once per seed and each stage 2 starts from the stage 1 of its own seed;
    --sweep-seeds runs the sweep's other settings with fewer seeds."""
    calls = record_runs(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["bootstrap_ablation.py", "--out", str(tmp_path), "--arms", "stage1", "random",
                                      "--sweep", "recipe", "0.2@0", "--seeds", "r", "1", "--sweep-seeds", "1"])
    ablation.main()
    names = [name for _, name, _ in calls]
    assert names == [
        "stage1-stage-1-itc-itm-itg", "stage1-stage-1-itc-itm-itg-seed1",
        "stage2-stage-1-itc-itm-itg-recipe", "stage2-stage-1-itc-itm-itg-recipe-seed1",
        "stage2-stage-1-itc-itm-itg-0-2-0-seed1",
        "stage2-no-stage-1-random-q-former-recipe", "stage2-no-stage-1-random-q-former-recipe-seed1",
        "stage2-no-stage-1-random-q-former-0-2-0-seed1",
    ]
    by_name = {name: overrides for _, name, overrides in calls}
    assert "train.seed=1" in by_name["stage1-stage-1-itc-itm-itg-seed1"]
    assert not any("seed" in o for o in by_name["stage1-stage-1-itc-itm-itg"]), "r: the recipe's own seeds"
    stage1_seed1 = tmp_path.resolve() / "stage1-stage-1-itc-itm-itg-seed1"
    for name in ("stage2-stage-1-itc-itm-itg-recipe-seed1", "stage2-stage-1-itc-itm-itg-0-2-0-seed1"):
        assert f"model.stage1_checkpoint={stage1_seed1}" in by_name[name] and "data.seed=1" in by_name[name]
    monkeypatch.setattr(sys, "argv", ["bootstrap_ablation.py", "--out", str(tmp_path), "--seeds", "r", "--sweep-seeds", "2"])
    with pytest.raises(SystemExit) as stop:
        ablation.main()
    assert stop.value.code == 2


def test_a_reused_run_must_match_the_recipe_as_it_is_now(tmp_path, monkeypatch):
    """A finished run is reused only if it had the overrides and every recipe setting they leave: a run made
    before the recipe changed is refused by name; where its stage-1 checkpoint or LLM cache lived may differ."""
    recipe = OmegaConf.to_container(OmegaConf.load(ROOT / ablation.STAGE2_RECIPE))
    overrides = ["model.stage1_checkpoint=/elsewhere/stage1", "eval.max_images=0", "train.steps=300"]
    run_dir = tmp_path / "stage2"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"caption_attr_acc": 0.5}')
    monkeypatch.setattr(ablation, "resolve_checkpoint", lambda path: path)

    def saved(**changes):
        config = OmegaConf.merge(recipe, OmegaConf.from_dotlist(
            ["model.stage1_checkpoint=/here/stage1", "eval.max_images=0", "train.steps=300", "train.output_dir=x"]))
        for key, value in changes.items():
            OmegaConf.update(config, key, value)
        OmegaConf.save(config, run_dir / ablation.CONFIG)

    saved()
    assert ablation.run("stage2.train", ablation.STAGE2_RECIPE, run_dir, overrides) == {"caption_attr_acc": 0.5}
    saved(**{"model.projection_init": "default"})
    with pytest.raises(SystemExit, match="was run with model.projection_init=default, not mean_token"):
        ablation.run("stage2.train", ablation.STAGE2_RECIPE, run_dir, overrides)
    saved(**{"train.steps": 600})
    with pytest.raises(SystemExit, match="train.steps=600, not 300"):
        ablation.run("stage2.train", ablation.STAGE2_RECIPE, run_dir, overrides)
    saved(**{"model.stage1_checkpoint": None})
    with pytest.raises(SystemExit, match="model.stage1_checkpoint=None"):
        ablation.run("stage2.train", ablation.STAGE2_RECIPE, run_dir, overrides)


def test_the_best_setting_is_chosen_on_the_sweep_seeds_and_then_run_on_every_seed(tmp_path, monkeypatch):
    """Settings compete on the sweep's seeds alone (the recipe's other seeds do not count); the winner then runs
    on every seed, so the arms' best rows have the same seeds."""
    calls = []
    accuracy = {("recipe", None): 0.4, ("recipe", 1): 0.9, ("0.2@0", None): 0.5, ("0.2@0", 1): 0.3}

    def fake_run(module, recipe, output_dir, overrides):
        calls.append(output_dir.name)
        label = "0.2@0" if "0-2-0" in output_dir.name else "recipe"
        acc = accuracy.get((label, 1 if output_dir.name.endswith("seed1") else None), 0.5)
        return {"caption_attr_acc": acc, "caption_colour_acc": acc, "caption_shape_acc": acc, "caption_loss": 0.5,
                "query_cosine": 0.5, "t2i_r1": 0.8, "i2t_r1": 0.8, "t2i_r5": 1.0, "i2t_r5": 1.0}

    monkeypatch.setattr(ablation, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bootstrap_ablation.py", "--out", str(tmp_path), "--arms", "random",
                                      "--sweep", "recipe", "0.2@0", "--seeds", "r", "1", "--sweep-seeds", "r"])
    ablation.main()
    assert calls == ["stage2-no-stage-1-random-q-former-recipe", "stage2-no-stage-1-random-q-former-recipe-seed1",
                     "stage2-no-stage-1-random-q-former-0-2-0", "stage2-no-stage-1-random-q-former-0-2-0-seed1"]
    recipe_row, best_row = (tmp_path / "ablation.md").read_text().splitlines()[2:]
    assert "| recipe | 65.0% | 40.0 / 90.0 |" in recipe_row, "the recipe's mean is higher, over other seeds"
    assert "| 0.2@0 | **40.0%** | 50.0 / 30.0 |" in best_row, "0.2@0 won on seed r, then ran on seed 1"
