"""tools/stage2_diagnostics.py: the measurements behind the README's account of the stage-2 demo."""

import sys
from pathlib import Path

import pytest
import torch

from lavis_lite.models.factory import create_stage2_model
from lavis_lite.models.llm import IGNORE
from stage2.objective import caption_text
from tiny_llm import save_tiny_llm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lavis_lite.evaluation.query_diversity import qformer_hidden_states, query_similarity  # noqa: E402
from tools.stage2_diagnostics import loss_by_word_kind, spread_ratio, token_word_index, word_kind  # noqa: E402


def test_qformer_hidden_states_follow_the_queries_through_the_qformer(tmp_path):
    """One state after the embeddings and one per layer, the last the query outputs; identical query tokens
    stay identical through every layer; the hooks are gone afterwards."""
    torch.manual_seed(0)
    model = create_stage2_model("tiny-stage2", [f"llm.path={save_tiny_llm('llama', tmp_path)}"])
    vision_tokens = torch.randn(6, 17, model.vision.width)
    with torch.no_grad():
        hidden = qformer_hidden_states(model.qformer, lambda: model.query_outputs(vision_tokens))
        queries = model.query_tokens.expand(6, -1, -1)
        assert len(hidden) == model.cfg.qformer.num_layers + 1
        torch.testing.assert_close(hidden[0], model.qformer.embeddings(queries, None))
        torch.testing.assert_close(hidden[-1], model.query_outputs(vision_tokens))
        assert max(query_similarity(h)[0] for h in hidden) < 0.99
        assert not any(m._forward_hooks for m in model.qformer.modules())
        model.query_tokens.copy_(model.query_tokens[:, :1].expand_as(model.query_tokens))
        same = qformer_hidden_states(model.qformer, lambda: model.query_outputs(vision_tokens))
    assert [query_similarity(h)[0] for h in same] == pytest.approx([1.0] * len(hidden), abs=1e-5)


def test_spread_ratio_is_the_image_dependent_part_over_the_mean():
    mean = torch.zeros(1, 3, 16)
    mean[..., 0] = 10.0
    step = torch.zeros(1, 3, 16)
    step[..., 1] = 1.0
    assert spread_ratio(torch.cat([mean + step, mean - step])) == pytest.approx(0.1)
    assert spread_ratio(mean.expand(5, 3, 16)) == 0.0


@pytest.mark.parametrize(
    "word, kind",
    [("red", "colour"), ("Purple", "colour"), ("cross", "shape"), ("crosses", "shape"), ("stars", "shape"),
     ("large", "size"), ("left", "position"), ("corner", "position"), ("below", "position"), ("a", "other"),
     ("photo", "other")],
)
def test_word_kind(word, kind):
    assert word_kind(word) == kind


class PieceTokenizer:
    """Words cut into two-letter pieces; a piece that starts a word carries its leading space. Id 0 is EOS."""

    all_special_ids = [0]

    def __init__(self):
        self.pieces = ["</s>"]

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            for start in range(0, len(word), 2):
                piece = (" " if start == 0 else "") + word[start : start + 2]
                if piece not in self.pieces:
                    self.pieces.append(piece)
                ids.append(self.pieces.index(piece))
        return ids + [0]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))


def test_token_word_index_groups_a_words_pieces():
    tokenizer = PieceTokenizer()
    ids = tokenizer.encode("a diamond at the top")
    # " a" | " di" "am" "on" "d" | " at" | " th" "e" | " to" "p" | EOS
    assert token_word_index(tokenizer, ids) == [0, 1, 1, 1, 1, 2, 3, 3, 4, 4, -1]


CAPTIONS = [
    "a small red circle on the left and a large blue square on the right",
    "there is a large green star in the top left corner",
]


def test_loss_by_word_kind_adds_up_to_the_model_loss(tmp_path):
    """After a prompt every caption token's loss lands in exactly one word of one kind: the word losses add up
    to the LM loss the model trains on, and the word counts are the captions' (EOS counts as `other`)."""
    torch.manual_seed(0)
    model = create_stage2_model("tiny-stage2", [f"llm.path={save_tiny_llm('llama', tmp_path)}", "prompt=a photo of"])
    vision_tokens = torch.randn(len(CAPTIONS), 17, model.vision.width)
    kinds = loss_by_word_kind(model, vision_tokens, CAPTIONS)
    counts = {kind: words for kind, (_, words) in kinds.items()}
    assert counts == {"colour": 3, "shape": 3, "size": 3, "position": 5, "other": 12 + 2}
    batch = caption_text(model, seed=0)(CAPTIONS)
    with torch.no_grad():
        loss = model(vision_tokens=vision_tokens, **batch).loss.item()
    tokens = (batch["labels"] != IGNORE).sum().item()
    assert sum(mean * words for mean, words in kinds.values()) / tokens == pytest.approx(loss, rel=1e-5)


def test_loss_by_word_kind_without_a_prompt_leaves_out_the_first_word(tmp_path):
    model = create_stage2_model("tiny-stage2", [f"llm.path={save_tiny_llm('llama', tmp_path)}"])
    assert model.cfg.prompt == ""
    kinds = loss_by_word_kind(model, torch.randn(len(CAPTIONS), 17, model.vision.width), CAPTIONS)
    assert {kind: words for kind, (_, words) in kinds.items()}["other"] == 12 - 2 + 2  # minus "a", "there"
