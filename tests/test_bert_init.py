"""A Q-Former initialised from a local BERT checkpoint reproduces that BERT on text, and the tokenizer gains [DEC]."""

import pytest
import torch
from transformers import BertConfig, BertModel

from lavis_lite import create_model
from lavis_lite.config import ConfigError
from lavis_lite.models.factory import create_stage2_model
from conftest import BERT_SPECIAL, redraw_, save_bert_tokenizer, tiny_config
from tiny_llm import save_tiny_llm

WORDS = ["a", "red", "blue", "circle", "square", "small", "big", "on", "the", "left", "right", "of"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    save_bert_tokenizer(path, WORDS)
    vocab = [*BERT_SPECIAL, *WORDS]
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    bert = BertModel(config, add_pooling_layer=False)
    redraw_(bert, seed=7)
    bert.save_pretrained(path)
    return path


def test_qformer_text_pass_equals_bert(bert_dir):
    cfg = tiny_config(f"qformer.bert={bert_dir}", f"qformer.vocab_size={len(WORDS) + 6}")
    model, tokenizer = create_model(cfg)
    model.eval()
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == len(WORDS) + 5 == model.bos_token_id
    batch = tokenizer(["a red circle on the left", "the big blue square"], padding=True, return_tensors="pt")
    bert = BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        text_out, _ = model.text_features(batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(text_out[real], expected[real], atol=1e-5, rtol=0)
    for layer in model.qformer.layers:
        for a, b in zip(layer.ffn_query.parameters(), layer.ffn_text.parameters()):
            assert torch.equal(a, b), "query FFN starts as a copy of the text FFN"


def test_self_attention_scale_multiplies_berts_output_projections_only(bert_dir):
    """`qformer.bert_self_attention_scale` multiplies each self-attention output projection's weights taken from BERT
    and leaves every other weight as BERT's; it must be positive."""
    common = (f"qformer.bert={bert_dir}", "qformer.vocab_size=18")
    torch.manual_seed(0)  # the same draw for the weights BERT does not give
    as_is, _ = create_model(tiny_config(*common))
    torch.manual_seed(0)
    scaled, _ = create_model(tiny_config(*common, "qformer.bert_self_attention_scale=0.5"))
    theirs = as_is.qformer.state_dict()
    assert sum(name.endswith("self_attn.out.weight") for name in theirs) == 4
    for name, weight in scaled.qformer.state_dict().items():
        expected = theirs[name] * 0.5 if name.endswith("self_attn.out.weight") else theirs[name]
        torch.testing.assert_close(weight, expected, atol=0, rtol=0, msg=name)
    with pytest.raises(ConfigError, match="bert_self_attention_scale=0.0 must be above 0"):
        create_model(tiny_config(*common, "qformer.bert_self_attention_scale=0"))


def test_stage2_without_stage1_starts_from_the_same_bert(bert_dir, tmp_path):
    """Stage 2 started without a stage-1 checkpoint takes BERT's weights on its query side as stage 1 does."""
    stage1, _ = create_model(tiny_config(f"qformer.bert={bert_dir}", "qformer.vocab_size=18"))
    stage2 = create_stage2_model(
        "tiny-stage2", [f"llm.path={save_tiny_llm('llama', tmp_path)}", f"qformer.bert={bert_dir}", "qformer.vocab_size=18"]
    )
    theirs = stage1.qformer.state_dict()
    from_bert = {k: v for k, v in stage2.qformer.state_dict().items() if ".cross_attn." not in k}
    assert any(".ffn_query." in k for k in from_bert) and all(k in theirs for k in from_bert)
    for name, weight in from_bert.items():
        assert torch.equal(weight, theirs[name]), name


def test_mismatched_bert_is_named(bert_dir):
    with pytest.raises(ValueError, match="qformer.hidden_size=64 but .* has 32"):
        create_model(tiny_config(f"qformer.bert={bert_dir}", "qformer.vocab_size=18", "qformer.hidden_size=64"))
    with pytest.raises(ValueError, match="set qformer.vocab_size=18"):
        create_model(tiny_config(f"qformer.bert={bert_dir}", "qformer.vocab_size=100"))
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found: .*missing"):
        create_model(tiny_config(f"qformer.bert={bert_dir / 'missing'}"))
    empty = bert_dir.parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="has no config.json: point it at a BertModel directory"):
        create_model(tiny_config(f"qformer.bert={empty}", f"qformer.tokenizer={bert_dir}", "qformer.vocab_size=18"))
