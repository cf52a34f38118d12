"""Model configuration: omegaconf structured dataclasses, YAML files and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from lavis_lite.errors import UserError


@dataclass
class VisionConfig:
    """The frozen image encoder: `kind` picks the adapter (see `lavis_lite.models.vision`)."""

    kind: str = "open_clip"  # open_clip | timm | vit
    name: str = "EVA01-g-14"  # open_clip / timm model name
    checkpoint: Optional[str] = None  # local weights file; None keeps the random init
    image_size: int = 224
    drop_last_block: bool = True  # BLIP-2 uses the penultimate block's output (no final norm)
    precision: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    # kind == "timm", CNNs: earlier feature levels (indices into the trunk's feature_info) pooled to the final
    # grid and appended to each token's channels, e.g. [2, 3] for EfficientNet's stride-8 and stride-16 maps
    extra_levels: list[int] = field(default_factory=list)
    extra_levels_pool: str = "avg"  # avg | max
    # kind == "vit": a small EVA-style ViT built from these fields (tests, HF parity)
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 128
    patch_size: int = 8
    layer_norm_eps: float = 1e-6


@dataclass
class QFormerConfig:
    """BERT layers with learned queries; cross-attention every `cross_attention_freq` layers."""

    bert: Optional[str] = None  # local BertModel directory (config, weights, vocab); None = random init
    tokenizer: Optional[str] = None  # local tokenizer directory; defaults to `bert`
    # Multiplies the self-attention output projections' weights taken from `bert` (1.0: BERT's own). A
    # sentence-embedding start such as all-MiniLM-L6-v2 was trained to pull a sentence's tokens onto one vector;
    # the queries, which see only each other in the image pass, then start nearly merged and, for some seeds, never
    # part. Below 1.0 each layer mixes less of the other tokens into a token until training grows it back.
    bert_self_attention_scale: float = 1.0
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30523  # bert-base-uncased's 30522 plus [DEC]
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    attn_impl: str = "auto"  # auto | sdpa | eager (auto: sdpa on CUDA, eager matmul-softmax on CPU)


@dataclass
class ModelConfig:
    """The stage-1 model: frozen vision encoder, `ln_vision`, Q-Former and the ITC/ITM/ITG heads."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    embed_dim: int = 256
    max_text_len: int = 32
    temperature: float = 0.07
    losses: list[str] = field(default_factory=lambda: ["itc", "itm", "itg"])
    itc_label_smoothing: float = 0.1
    itg_label_smoothing: float = 0.1
    # Shares of each local batch (its first pairs) that ITM and ITG are computed on; ITC always sees all of it
    # and ITM negatives are still drawn from the whole global batch. 1.0 is BLIP-2; lower them where compute is
    # scarce: ITM's joint pass over 3B pairs costs ~3x the ITC passes, ITG (text attending to the image pass's
    # cached query keys/values) about one text pass plus the vocabulary projection.
    itm_batch_fraction: float = 1.0
    itg_batch_fraction: float = 1.0
    ln_vision_eps: float = 1e-5  # LAVIS's (beside the ViT's 1e-6); transformers uses the ViT's layer_norm_eps
    # How the new Linear starts: `default` (nn.Linear's, as LAVIS's opt_proj / t5_proj), or `mean_token`: weight
    # zero and bias the LLM's mean input embedding, so every soft prompt starts as one neutral token.
    projection_init: str = "default"
    # Pairs whose cleaned captions are equal (the data's `sample_id`) are ITC positives of each other and never
    # ITM negatives. LAVIS's BLIP-2 pre-training counts only a pair itself (False): on web data, boilerplate
    # captions would make unrelated images positives.
    caption_positives: bool = True
    # True: the gathered ITC features carry gradients back to their ranks (the exact full-batch gradient).
    # False: LAVIS's concat_all_gather, no gradient through the gathered features (the local ones included),
    # so each ITC direction trains only its own side.
    itc_gather_with_grad: bool = True
    # A LAVIS stage-1 checkpoint (`blip2_pretrained.pth`) loaded over the built model: Q-Former, queries,
    # ln_vision, ITC/ITM/ITG heads and temperature (and the ViT where the file holds it); None: none.
    lavis_checkpoint: Optional[str] = None


@dataclass
class LanguageModelConfig:
    """The frozen LLM of stage 2: any local `AutoModelForCausalLM` / `AutoModelForSeq2SeqLM`, or a GGUF file."""

    path: str = ""  # a transformers model directory (save_pretrained layout) or a .gguf file
    # dtype of the frozen weights: auto = bf16 where it is native (lavis_lite.precision), else fp16 on CUDA and
    # fp32 on CPU; stage2.train makes auto follow train.precision (the weights are cast once, not at every op).
    # fp32 under bf16 autocast keeps the residual stream and the soft prompts' gradients in fp32: at the demo's
    # batch 8 and Linear lr 2e-3, an LLM held in bf16 threw a third of runs back above their starting loss.
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    attn_impl: str = "auto"  # transformers' attn_implementation (eager, sdpa, ...); auto: its default on CUDA, eager on CPU
    cache_dir: Optional[str] = None  # where a GGUF is dequantised once (stage2.train: <output_dir>/llm)
    # The token a training caption ends with and generation stops at, as text; None: the tokenizer's EOS.
    # BLIP-2 OPT trains on `caption + "\n"` and stops at "\n" (HF's BLIP-2 OPT: eos_token_id 50118).
    stop_text: Optional[str] = None


@dataclass
class Stage2ModelConfig:
    """The stage-2 model: frozen image encoder, `ln_vision`, the Q-Former's query side, a Linear, a frozen LLM."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    # Trained stage-1 weights (a run directory or checkpoint) for ln_vision, queries and Q-Former; None: none.
    stage1_checkpoint: Optional[str] = None
    # A LAVIS stage-2 checkpoint (`blip2_pretrained_opt2.7b.pth`, `blip2_pretrained_flant5xl.pth`) loaded over
    # the built model: ln_vision, queries, the Q-Former's query side and opt_proj / t5_proj; None: none.
    lavis_checkpoint: Optional[str] = None
    ln_vision_eps: float = 1e-5  # LAVIS's (beside the ViT's 1e-6); transformers uses the ViT's layer_norm_eps
    # How the new Linear starts: `default` (nn.Linear's, as LAVIS's opt_proj / t5_proj), or `mean_token`: weight
    # zero and bias the LLM's mean input embedding, so every soft prompt starts as one neutral token.
    projection_init: str = "default"
    prompt: str = ""  # prepended to every training caption and used by default in generation (BLIP-2 OPT: "a photo of")
    max_text_len: int = 32  # LLM tokens of prompt + caption


class ConfigError(UserError):
    """A configuration problem, phrased so that the user can fix it."""


def config_dir() -> Path:
    """The packaged configs: the repository's `configs/`, installed as `lavis_lite.configs`."""
    try:
        return Path(str(importlib.resources.files("lavis_lite.configs")))
    except ModuleNotFoundError:  # a source tree on PYTHONPATH, not installed
        return Path(__file__).resolve().parent.parent / "configs"


def _valid_keys(schema: Any, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of a dataclass schema, mapped to its field type (a dataclass, or the annotation)."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        child = type(sub) if dataclasses.is_dataclass(sub) else None
        keys[prefix + f.name] = child or hints[f.name]
        if child is not None:
            keys.update(_valid_keys(child, prefix + f.name + "."))
    return keys


def _is_mapping(kind: Any) -> bool:
    return typing.get_origin(kind) is dict


def _is_text(kind: Any) -> bool:
    return kind is str or kind == Optional[str]


def _parse_override(item: str, valid: dict[str, Any]) -> tuple[str, Any]:
    """`key=value` -> (key, value) as YAML reads it, except that text fields keep YAML's boolean words
    (`train.precision=no`, `=off`) as the text written."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. qformer.num_layers=6)")
    key, text = item.split("=", 1)
    try:
        value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
    except yaml.YAMLError as err:  # e.g. `llm.stop_text=:`
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"override '{item}': the value is not valid YAML ({problem}): quote it, e.g. {key}='{text}'") from None
    if isinstance(value, bool) and _is_text(valid.get(key)):
        value = text
    return key, value


def _reject_unknown(values: Any, valid: dict[str, Any], prefix: str, source: str) -> None:
    """Raise a ConfigError naming the first unknown key and the nearest valid one."""
    if not isinstance(values, (dict, DictConfig)):
        return
    for key, value in values.items():
        dotted = prefix + str(key)
        if dotted not in valid:
            siblings = [k for k in valid if k.startswith(prefix) and "." not in k[len(prefix):]]
            nearest = difflib.get_close_matches(dotted, siblings, n=1, cutoff=0.0)
            hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
            raise ConfigError(f"unknown config key '{dotted}' in {source}{hint}")
        if dataclasses.is_dataclass(valid[dotted]):
            _reject_unknown(value, valid, dotted + ".", source)


def merge_config(schema: type, sources: Sequence[str | Path | dict], overrides: Sequence[str] = ()) -> Any:
    """Merge YAML files / dicts and `key=value` overrides onto a structured schema.

    Unknown keys raise `ConfigError` naming the key and the nearest valid one;
    values of the wrong type raise `ConfigError` naming the key.
    """
    merged = OmegaConf.structured(schema)
    valid = _valid_keys(schema)
    layers: list[tuple[Any, str]] = []
    for source in sources:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            layers.append((_load_yaml(path), str(path)))
        else:
            layers.append((OmegaConf.create(source), "config dict"))
    for values, source in layers:
        _reject_unknown(values, valid, "", source)
        merged = _checked(lambda: OmegaConf.merge(merged, values), source)
    for item in overrides:
        key, value = _parse_override(item, valid)
        source = f"override '{key}'"
        _reject_unknown(OmegaConf.from_dotlist([item]), valid, "", source)
        # A mapping given on the command line replaces the recipe's (`train.optim.lr_scale={}` clears it).
        _checked(lambda: OmegaConf.update(merged, key, value, merge=not _is_mapping(valid.get(key))), source)
    return OmegaConf.to_object(merged)


def _load_yaml(path: Path) -> DictConfig:
    """A YAML file that is a mapping of config keys; ConfigError naming the file (and line) otherwise."""
    try:
        loaded = OmegaConf.load(path)
    except OSError:  # omegaconf's answer to YAML that loads as a scalar
        loaded = None
    except Exception as err:  # yaml's parser errors and UnicodeDecodeError on binary files
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix the file or give another --config") from None
    if not isinstance(loaded, DictConfig):
        kind = "a list" if isinstance(loaded, ListConfig) else "not a mapping"
        raise ConfigError(f"{path} is {kind}: a config file maps keys to values (e.g. `train:` then `steps: 100`)")
    return loaded


def at_least(section: str, config: Any, **minimums: int) -> None:
    """ConfigError naming `section.key` for the first field of `config` below its minimum."""
    for key, minimum in minimums.items():
        value = getattr(config, key)
        if value < minimum:
            raise ConfigError(f"{section + '.' if section else ''}{key}={value}: must be at least {minimum}")


def _checked(apply: Callable[[], Any], source: str) -> Any:
    try:
        return apply()
    except Exception as err:  # omegaconf's validation errors carry the key in `full_key`
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"bad value for config key '{key}' in {source}: {err.args[0].splitlines()[0]}") from None


def list_models() -> list[str]:
    """The names of the packaged model configs, for `create_model(name)`."""
    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def named_config(name_or_path: str | Path) -> Path:
    """A YAML path as given, or the packaged model config of that name (see `list_models()`)."""
    return _packaged(name_or_path, "model/", "model config", list_models)


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe YAML as given, or a packaged recipe by name (`stage1/demo`, `stage2/paper-opt2.7b`, ...)."""

    def recipes() -> list[str]:
        found = (p for p in config_dir().glob("*/*.yaml") if p.parent.name != "model")
        return sorted(str(p.relative_to(config_dir()).with_suffix("")) for p in found)

    return _packaged(name_or_path, "", "recipe", recipes)


def _packaged(name_or_path: str | Path, folder: str, what: str, known: Callable[[], list[str]]) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = config_dir() / f"{folder}{name_or_path}.yaml"
    if not packaged.is_file():
        raise ConfigError(f"no {what} '{name_or_path}': give a YAML path or one of {known()}")
    return packaged


def load_model_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """A stage-1 ModelConfig from a YAML path or a name under `configs/model/`."""
    return merge_config(ModelConfig, [named_config(name_or_path)], overrides)


def to_dict(config: Any) -> dict:
    """A plain dict of a structured config (for checkpoints and logs)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


__all__ = [
    "VisionConfig",
    "QFormerConfig",
    "ModelConfig",
    "LanguageModelConfig",
    "Stage2ModelConfig",
    "ConfigError",
    "merge_config",
    "load_model_config",
    "named_config",
    "list_models",
    "recipe_path",
    "config_dir",
    "to_dict",
]
