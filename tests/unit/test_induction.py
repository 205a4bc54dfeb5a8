"""Induction-head scores: the prefix-matching maths on hand-built attention patterns, eager
attention probabilities on every decoder architecture, the copying score (shape on every
decoder, and a head built to copy beating the rest), and the helpers."""

from __future__ import annotations

import json

import pytest
import torch

from editing_core.induction import (
    InductionConfig,
    attention_probabilities,
    candidate_tokens,
    copying_scores,
    Unembedding,
    _copying_margins,
    eager_attention,
    head_outputs,
    head_values,
    induction_scores,
    induction_targets,
    overlap,
    prefix_matching_score,
    prefix_matching_scores,
    repeated_sequences,
    token_inputs,
    top_heads,
    uniform_causal_attention,
)
from editing_core.models.tiny import TINY_CONFIGS, tiny_model

CAUSAL = [t for t in TINY_CONFIGS if t != "bert"]
SMALL = InductionConfig(seq_len=6, n_sequences=3, batch_size=2, copy_tokens=12)


# ---------------------------------------------------------------------------------------
# prefix matching maths
# ---------------------------------------------------------------------------------------

SEGMENT = [10, 11, 12, 13, 14]
TOKENS = torch.tensor([1, *SEGMENT, *SEGMENT])  # BOS, segment, its repeat: T = 11
SCORED = range(6, 11)  # the repeat's positions


def patterns(length: int = len(TOKENS), period: int = len(SEGMENT)) -> torch.Tensor:
    """(1, 3, T, T): head 0 induction, head 1 uniform, head 2 previous token (rows sum to 1)."""
    induction = torch.zeros(length, length)
    previous = torch.zeros(length, length)
    for i in range(length):
        induction[i, i - period + 1 if i >= period + 1 else 0] = 1.0
        previous[i, max(i - 1, 0)] = 1.0
    return torch.stack([induction, uniform_causal_attention(length), previous]).unsqueeze(0)


def test_prefix_matching_of_constructed_patterns():
    scores = prefix_matching_score(patterns(), TOKENS)
    assert scores.shape == (1, 3)
    assert scores[0, 0].item() == pytest.approx(1.0)
    expected_uniform = sum(1 / (i + 1) for i in SCORED) / len(SCORED)
    assert scores[0, 1].item() == pytest.approx(expected_uniform)
    assert scores[0, 2].item() == pytest.approx(0.0, abs=1e-7)


def test_prefix_matching_batched_equals_pooled_positions():
    other = torch.tensor([1, 20, 21, 22, 23, 24, 20, 21, 22, 23, 24])
    batch = torch.stack([patterns(), patterns()])  # (B, L, H, T, T)
    scores = prefix_matching_score(batch, torch.stack([TOKENS, other]))
    assert torch.allclose(scores, prefix_matching_score(patterns(), TOKENS))


def test_induction_targets_find_every_earlier_occurrence():
    tokens = torch.tensor([[1, 2, 1, 3, 2, 1]])
    targets = induction_targets(tokens)[0]
    expected = {2: {1}, 4: {2}, 5: {1, 3}}  # query -> keys right after earlier occurrences
    for query in range(6):
        assert set(targets[query].nonzero().flatten().tolist()) == expected.get(query, set())


def test_prefix_matching_needs_a_repeat():
    with pytest.raises(ValueError, match="no token occurs twice"):
        prefix_matching_score(uniform_causal_attention(3)[None, None], torch.tensor([4, 5, 6]))


def test_repeated_sequences_are_seeded_distinct_and_free_of_specials():
    loaded = tiny_model("llama")
    tokens = repeated_sequences(loaded, SMALL)
    assert tokens.shape == (3, 1 + 6 * 2)
    assert (tokens[:, 0] == loaded.tokenizer.bos_token_id).all()
    segment = tokens[:, 1:7]
    assert torch.equal(segment, tokens[:, 7:])
    assert all(len(set(row.tolist())) == 6 for row in segment)
    assert not set(segment.flatten().tolist()) & set(loaded.tokenizer.all_special_ids)
    assert torch.equal(tokens, repeated_sequences(loaded, SMALL))
    assert len(candidate_tokens(loaded)) == len(loaded.tokenizer) - 3


# ---------------------------------------------------------------------------------------
# the models
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", CAUSAL)
def test_eager_attention_probabilities_on_every_decoder(model_type):
    loaded = tiny_model(model_type)
    before = loaded.model.config._attn_implementation
    tokens = repeated_sequences(loaded, SMALL)
    attentions = attention_probabilities(loaded, tokens)
    assert loaded.model.config._attn_implementation == before
    a = loaded.adapter
    length = tokens.shape[1]
    assert attentions.shape == (3, a.num_layers, a.num_heads, length, length)
    assert torch.allclose(attentions.sum(-1), torch.ones(()), atol=1e-5)
    assert attentions.triu(1).abs().max() == 0  # causal

    scores = induction_scores(loaded, SMALL)
    for table in (scores.prefix_matching, scores.copying):
        assert table.shape == (a.num_layers, a.num_heads)
        assert torch.isfinite(table).all()
    assert (scores.prefix_matching >= 0).all() and (scores.prefix_matching <= 1).all()
    assert torch.allclose(scores.prefix_matching, prefix_matching_score(attentions, tokens))
    assert 0 < scores.prefix_matching_chance < 1
    json.dumps(scores.to_json())


def test_eager_attention_restores_on_error():
    model = tiny_model("llama").model
    with pytest.raises(RuntimeError, match="boom"), eager_attention(model):
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_head_values_match_the_value_projection_with_grouped_query_heads():
    loaded = tiny_model("llama")
    a = loaded.adapter
    ids = torch.tensor([5, 6, 7])
    x = token_inputs(loaded, ids)
    assert torch.equal(x, loaded.model.get_input_embeddings()(ids))
    values = head_values(loaded, x)  # (L, N, H, head_dim)
    for layer, block in enumerate(a.blocks()):
        v = block.self_attn.v_proj(block.input_layernorm(x)).unflatten(-1, (a.num_kv_heads, a.head_dim))
        expected = v.repeat_interleave(a.num_heads // a.num_kv_heads, dim=1)  # query head h -> kv h // group
        assert torch.allclose(values[layer], expected, atol=1e-6)


@pytest.mark.parametrize("model_type", CAUSAL)
@torch.no_grad()
def test_copying_margins_from_moments_equal_full_logits(model_type):
    loaded = tiny_model(model_type)
    tokens = torch.tensor([5, 9, 17, 30])
    outputs = head_outputs(loaded, head_values(loaded, token_inputs(loaded, tokens))[1], 1)  # (N, H, hidden)
    margins = _copying_margins(loaded, Unembedding.of(loaded, chunk=7), outputs, tokens)

    def logits(residual):
        for module in loaded.adapter.final_modules():
            residual = module(residual)
        return loaded.model.get_output_embeddings()(residual)

    delta = logits(outputs) - logits(torch.zeros(outputs.shape[-1]))  # (N, H, vocab)
    own = delta.gather(2, tokens[:, None, None].expand(-1, delta.shape[1], 1)).squeeze(2)
    expected = (own - delta.mean(-1)) / delta.std(-1, correction=0)
    assert torch.allclose(margins, expected, atol=1e-4)


@torch.no_grad()
def test_a_head_built_to_copy_scores_highest():
    loaded = tiny_model("llama")
    model, a = loaded.model, loaded.adapter
    d = a.head_dim
    # unit-norm embeddings in the first d dimensions, unembedding = embedding: a head whose
    # OV circuit is the identity there raises the token's own logit most; its negation lowers it
    embeddings = torch.zeros_like(model.get_input_embeddings().weight)
    embeddings[:, :d] = torch.nn.functional.normalize(torch.randn(len(embeddings), d), dim=-1)
    model.get_input_embeddings().weight.copy_(embeddings)
    model.get_output_embeddings().weight.copy_(embeddings)
    attn = a.blocks()[0].self_attn
    attn.v_proj.weight[:d] = torch.eye(d, a.hidden_size)  # kv head 0 reads the first d dims
    attn.o_proj.weight[:, :d] = torch.eye(a.hidden_size, d)  # query head 0 writes them back
    attn.o_proj.weight[:, d:2 * d] = -torch.eye(a.hidden_size, d)  # head 1 (same kv head) negates
    scores = copying_scores(loaded, InductionConfig(copy_tokens=40))
    others = torch.ones_like(scores, dtype=torch.bool)
    others[0, :2] = False
    assert scores[0, 0] > 2.0  # in standard deviations of the logit changes; random heads: |score| < 1
    assert scores[others].abs().max() < scores[0, 0] / 2
    assert scores[0, 1] == pytest.approx(-scores[0, 0])


def test_bert_is_rejected():
    loaded = tiny_model("bert")
    with pytest.raises(ValueError, match="causal"):
        prefix_matching_scores(loaded, SMALL)
    with pytest.raises(ValueError, match="causal"):
        copying_scores(loaded, SMALL)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def test_top_heads_and_overlap():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.9]])
    assert top_heads(scores, 3) == [(0, 1), (1, 2), (1, 0)]
    result = overlap([(0, 1), (1, 2)], [(1, 2), (1, 0)])
    assert result == {"count": 1, "jaccard": pytest.approx(1 / 3), "shared": [(1, 2)]}
    assert overlap([], [])["jaccard"] == 1.0


def test_plot_heatmap_writes_a_png(tmp_path):
    from editing_core.importance import plot_head_heatmap

    path = plot_head_heatmap(torch.rand(4, 3), tmp_path / "heads.png", title="prefix matching")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
