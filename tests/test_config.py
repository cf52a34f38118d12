"""Configs: YAML + overrides merge onto the schema; unknown keys and bad values are named."""

from pathlib import Path

import pytest

from lavis_lite import ConfigError, ModelConfig, create_model, load_model_config, merge_config


def test_yaml_and_overrides_merge():
    cfg = load_model_config("tiny", ["qformer.num_layers=2", "losses=[itc]"])
    assert isinstance(cfg, ModelConfig)
    assert cfg.qformer.num_layers == 2 and cfg.losses == ["itc"] and cfg.vision.kind == "vit"


@pytest.mark.parametrize(
    "source, overrides, message",
    [
        ({"qformer": {"num_layer": 3}}, [], "unknown config key 'qformer.num_layer' in config dict; did you mean 'qformer.num_layers'"),
        ({}, ["vison.width=3"], "unknown config key 'vison' in override 'vison.width'; did you mean 'vision'"),
        ({}, ["embed_dims=128"], "did you mean 'embed_dim'"),
        ({}, ["qformer.num_layers=many"], "bad value for config key 'qformer.num_layers'"),
        ({}, ["qformer.num_layers"], "not of the form key=value"),
    ],
)
def test_bad_keys_are_named(source, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        merge_config(ModelConfig, [source], overrides)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("vision:\n  kind: vit\n  widht: 64\n")
    with pytest.raises(ConfigError, match=f"unknown config key 'vision.widht' in {path}; did you mean 'vision.width'"):
        load_model_config(path)


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="no model config 'vitg'.*blip2-stage1-vitg"):
        load_model_config("vitg")


def test_every_shipped_model_config_loads():
    for name in ("tiny", "blip2-stage1-vitg"):
        assert isinstance(load_model_config(name), ModelConfig)


def test_factory_builds_from_name():
    model, tokenizer = create_model("tiny", ["qformer.num_layers=2"])
    assert tokenizer is None and len(model.qformer.layers) == 2


def test_every_shipped_stage1_recipe_loads():
    from pathlib import Path

    from stage1.config import Stage1Config, load_stage1_config

    recipes = sorted((Path(__file__).resolve().parent.parent / "configs" / "stage1").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"demo", "paper-vitg", "tiny"}
    for path in recipes:
        assert isinstance(load_stage1_config(path), Stage1Config)
    paper = load_stage1_config(recipes[[p.stem for p in recipes].index("paper-vitg")])
    assert paper.data.batch_size * 16 == 1680 and paper.train.steps == 250_000
    assert paper.train.optim.betas == [0.9, 0.98] and paper.model.qformer.num_query_tokens == 32


def test_text_fields_keep_yaml_boolean_words():
    """`train.precision=no` is accelerate's name for fp32, not YAML's False."""
    from stage1.config import load_stage1_config

    cfg = load_stage1_config(Path(__file__).resolve().parent.parent / "configs/stage1/tiny.yaml", ["train.precision=no"])
    assert cfg.train.precision == "no"
    with pytest.raises(ConfigError, match="bad value for config key 'train.steps'"):
        load_stage1_config(Path(__file__).resolve().parent.parent / "configs/stage1/tiny.yaml", ["train.steps=no"])


def test_a_mapping_override_replaces_the_recipes_mapping():
    """`train.optim.lr_scale={}` clears the recipe's multipliers (a merge would keep them all)."""
    from stage2.config import load_stage2_config

    recipe = Path(__file__).resolve().parent.parent / "configs/stage2/demo.yaml"
    assert load_stage2_config(recipe).train.optim.lr_scale  # the recipe sets some
    assert load_stage2_config(recipe, ["train.optim.lr_scale={}"]).train.optim.lr_scale == {}
    replaced = load_stage2_config(recipe, ["train.optim.lr_scale={qformer: 0.5}", "train.optim.lr_scale.ln_vision=0"])
    assert replaced.train.optim.lr_scale == {"qformer": 0.5, "ln_vision": 0.0}


def test_stage2_demo_recipe_reads_the_stage1_demo_model():
    """The stage-2 demo restates the stage-1 demo's encoder and Q-Former shape: they must agree."""
    from stage1.config import load_stage1_config
    from stage2.config import load_stage2_config

    root = Path(__file__).resolve().parent.parent / "configs"
    stage1, stage2 = load_stage1_config(root / "stage1/demo.yaml"), load_stage2_config(root / "stage2/demo.yaml")
    assert stage2.model.stage1_checkpoint == stage1.train.output_dir
    assert stage2.model.vision == stage1.model.vision
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "num_query_tokens",
                "cross_attention_freq"):
        assert getattr(stage2.model.qformer, key) == getattr(stage1.model.qformer, key), key


def test_recipes_choose_clipping_and_positives_and_the_paper_ones_follow_lavis():
    """Gradient clipping, caption positives and the ITC gather are stated by every recipe, not inherited;
    the paper recipes do as LAVIS does (no clipping, each pair its own positive, concat_all_gather)."""
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(root.glob("stage[12]/*.yaml")):
        recipe = OmegaConf.load(path)
        assert "grad_clip" in recipe.train.optim, path
        if path.parent.name == "stage1":
            assert "caption_positives" in recipe.model and "itc_gather_with_grad" in recipe.model, path
        if path.stem.startswith("paper"):
            assert recipe.train.optim.grad_clip is None, path
            if path.parent.name == "stage1":
                assert recipe.model.caption_positives is False and recipe.model.itc_gather_with_grad is False
