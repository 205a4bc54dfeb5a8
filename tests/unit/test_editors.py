"""The editor registry, FT and FT+KL on tiny models: they edit, return an artifact, and leave
the model exactly as they found it."""

from __future__ import annotations

import pytest
import torch

from editing_core.artifacts import WeightDeltaArtifact, weights_hash
from editing_core.config import config_to_dict, load_config
from editing_core.data import EditRequest
from editing_core.editors import EDITORS, Editor, editor_names, make_editor
from editing_core.editors.ft import FTConfig, FTEditor
from editing_core.editors.ft_kl import FTKLConfig, FTKLEditor
from editing_core.evaluate import EvalConfig, evaluate
from editing_core.models.tiny import tiny_model
from editing_core.tokens import completion_logits, kl_from_reference, text_batch
from tests.conftest import same_state, snapshot

FAST = EvalConfig(generated=False)


def test_registry_has_ft_and_ft_kl():
    names = editor_names()
    assert {"ft", "ft_kl"} <= set(names) and names == sorted(names)
    assert EDITORS["ft"] is FTEditor and EDITORS["ft_kl"] is FTKLEditor
    for name in names:
        cls = EDITORS[name]
        assert issubclass(cls, Editor) and cls.name == name
        editor = make_editor(name)
        assert isinstance(editor, cls) and editor.config == cls.config_class()


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError) as info:
        make_editor("rome")
    message = str(info.value)
    assert "'rome'" in message
    for name in editor_names():
        assert name in message


def test_ft_reaches_full_edit_success_with_a_delta_on_exactly_the_configured_params(llama, facts):
    base_state = snapshot(llama.model)
    editor = make_editor("ft", layers=(0, 1), roles=("mlp_out",), steps=30, lr=1e-2)
    artifact = editor.edit(llama, facts)
    assert isinstance(artifact, WeightDeltaArtifact) and artifact.kind == "weight_delta"
    names = llama.adapter.param_names(("mlp_out",), (0, 1))
    assert set(artifact.deltas) == set(names) == set(artifact.meta.hashed_params)
    for name, delta in artifact.deltas.items():
        param = llama.model.get_parameter(name)
        assert delta.dense.shape == param.shape and delta.dense.dtype == param.dtype
        assert delta.dense.abs().max() > 0 and not delta.dense.requires_grad
    assert same_state(llama.model, base_state)
    report = evaluate(llama, facts, artifact, config=FAST)
    assert report.metrics["pre_edit_success"] < 0.5
    assert report.metrics["edit_success"] == 1.0
    assert same_state(llama.model, base_state)


def test_ft_on_conv1d_weights_and_other_roles(gpt2, facts):
    """GPT-2 stores weights transposed (Conv1D); deltas keep the parameter's own orientation."""
    artifact = make_editor("ft", layers=(-1,), roles=("mlp_in", "attn_out"), steps=5, lr=5e-2).edit(gpt2, facts[:1])
    assert set(artifact.deltas) == {"transformer.h.1.mlp.c_fc.weight", "transformer.h.1.attn.c_proj.weight"}
    for name, delta in artifact.deltas.items():
        assert delta.dense.shape == gpt2.model.get_parameter(name).shape
    before = evaluate(gpt2, facts[:1], artifact, config=FAST).metrics
    assert before["edit_success"] == 1.0


def test_edit_leaves_the_model_bit_for_bit_unchanged(llama, facts):
    base_state = snapshot(llama.model)
    make_editor("ft_kl", layers=(0, 1), roles=("mlp_in", "mlp_out", "attn_out"), steps=3, lr=1e-1).edit(llama, facts)
    assert same_state(llama.model, base_state)
    assert not any(p.requires_grad for p in llama.model.parameters())
    assert all(p.grad is None for p in llama.model.parameters())
    assert not llama.model.training


def test_ft_kl_without_locality_texts_raises_and_leaves_the_model_unchanged(llama):
    base_state = snapshot(llama.model)
    with pytest.raises(ValueError, match="locality_prompt.*kl_prompts"):
        make_editor("ft_kl", layers=(0,), steps=2).edit(llama, [EditRequest("Alice plays", "chess")])
    assert same_state(llama.model, base_state)
    assert not any(p.requires_grad for p in llama.model.parameters())
    # requests' locality prompts are not used when use_request_locality is off
    with pytest.raises(ValueError, match="kl_prompts"):
        make_editor("ft_kl", layers=(0,), steps=2, use_request_locality=False).edit(
            llama, [EditRequest("Alice plays", "chess", locality_prompt="Bob works for")])
    assert same_state(llama.model, base_state)
    # kl_prompts alone are enough
    artifact = make_editor("ft_kl", layers=(0,), steps=2, kl_prompts=["Bob works for Sega"]).edit(
        llama, [EditRequest("Alice plays", "chess")])
    assert artifact.meta.config["kl_prompts"] == ["Bob works for Sega"]


def test_edit_failing_in_the_middle_of_the_loop_restores_everything(gpt2):
    """The second batch is longer than GPT-2's 128 positions: its forward fails after the first
    batch's backward already set gradients. The model must come back clean."""
    base_state = snapshot(gpt2.model)
    long_prompt = " ".join(["the"] * 200)
    requests = [EditRequest("Alice plays", "chess"), EditRequest(long_prompt, "chess")]
    with pytest.raises((IndexError, RuntimeError)):
        make_editor("ft", layers=(0, 1), steps=3, batch_size=1).edit(gpt2, requests)
    assert same_state(gpt2.model, base_state)
    assert not any(p.requires_grad for p in gpt2.model.parameters())
    assert all(p.grad is None for p in gpt2.model.parameters())


def test_bad_layers_fail_before_anything_changes(llama, facts):
    base_state = snapshot(llama.model)
    with pytest.raises(ValueError, match="layer 4 is out of range"):
        make_editor("ft").edit(llama, facts)  # default layers (4, 5, 6) on a 2-layer model
    with pytest.raises(ValueError, match="at least one request"):
        make_editor("ft", layers=(0,)).edit(llama, [])
    assert same_state(llama.model, base_state)


def test_negative_layers(llama, facts):
    artifact = make_editor("ft", layers=(-1,), steps=1).edit(llama, facts[:1])
    assert set(artifact.deltas) == {"model.layers.1.mlp.down_proj.weight"}


def test_norm_constraint_bounds_every_delta_element(llama, facts):
    eps = 1e-3
    artifact = make_editor("ft", layers=(0, 1), roles=("mlp_out", "attn_out"), steps=10, lr=1e-2,
                           norm_constraint=eps).edit(llama, facts)
    largest = max(d.dense.abs().max().item() for d in artifact.deltas.values())
    assert largest <= eps + 1e-7
    assert largest >= 0.9 * eps  # the constraint was active: lr 1e-2 for 10 steps moves weights further
    free = make_editor("ft", layers=(0, 1), roles=("mlp_out", "attn_out"), steps=10, lr=1e-2).edit(llama, facts)
    assert max(d.dense.abs().max().item() for d in free.deltas.values()) > 5 * eps


def test_edits_are_deterministic_and_batching_only_changes_rounding(llama, facts):
    kwargs = dict(layers=(0, 1), steps=5, lr=1e-2)
    a = make_editor("ft", **kwargs).edit(llama, facts)
    b = make_editor("ft", **kwargs).edit(llama, facts)
    c = make_editor("ft", batch_size=1, **kwargs).edit(llama, facts)  # gradient accumulation
    for name in a.deltas:
        assert torch.equal(a.deltas[name].dense, b.deltas[name].dense)
        torch.testing.assert_close(c.deltas[name].dense, a.deltas[name].dense, rtol=0, atol=1e-5)


def test_ft_kl_with_zero_weight_is_ft(llama, facts):
    kwargs = dict(layers=(0, 1), steps=5, lr=1e-2)
    ft = make_editor("ft", **kwargs).edit(llama, facts)
    ft_kl = make_editor("ft_kl", kl_weight=0.0, **kwargs).edit(llama, facts)
    for name in ft.deltas:
        assert torch.equal(ft.deltas[name].dense, ft_kl.deltas[name].dense)


@pytest.mark.parametrize("seed", [0, 1])
def test_ft_kl_keeps_locality_predictions_closer_than_ft(seed):
    loaded = tiny_model("llama", seed=seed)
    requests = [EditRequest("The capital of France is", "Rome", locality_prompt="Alice plays", locality_answer="chess"),
                EditRequest("Bob works for", "Sega", locality_prompt="The river of Egypt is", locality_answer="Cairo")]
    texts = ["Alice plays chess", "The river of Egypt is Cairo"]
    batch = text_batch(loaded.tokenizer, texts)
    with torch.no_grad():
        reference = completion_logits(loaded.model, batch).float().log_softmax(-1)

    def drift(artifact):
        with artifact.attached(loaded.model), torch.no_grad():
            return kl_from_reference(completion_logits(loaded.model, batch), reference, batch.attention_mask.bool()).item()

    kwargs = dict(layers=(0, 1), steps=20, lr=5e-2)
    ft = make_editor("ft", **kwargs).edit(loaded, requests)
    ft_kl = make_editor("ft_kl", kl_weight=100.0, **kwargs).edit(loaded, requests)
    assert drift(ft) > 0
    assert drift(ft_kl) < 0.1 * drift(ft)
    m_ft, m_kl = (evaluate(loaded, requests, a, config=FAST).metrics for a in (ft, ft_kl))
    assert m_ft["edit_success"] == m_kl["edit_success"] == 1.0  # both still make the edit
    assert m_kl["locality"] >= m_ft["locality"]


def test_artifact_meta_records_method_config_requests_and_parent(llama, facts):
    editor = make_editor("ft_kl", layers=(0,), steps=2, kl_weight=0.5, kl_prompts=("Dave plays",))
    names = llama.adapter.param_names(("mlp_out",), (0,))
    base_hash = weights_hash(llama.model, names)
    artifact = editor.edit(llama, facts)
    meta = artifact.meta
    assert meta.method == "ft_kl" and meta.base_model == "tiny-llama"
    assert meta.config == config_to_dict(editor.config)
    assert load_config(FTKLConfig, meta.config) == editor.config
    assert meta.requests == tuple(facts)
    assert meta.parent is None
    assert meta.base_hash == base_hash and meta.hashed_params == tuple(names)
    assert len(meta.artifact_id) == 32

    with artifact.attached(llama.model):
        child = make_editor("ft", layers=(0,), steps=2).edit(llama, facts[:1], parent=artifact)
    assert child.meta.parent == meta.artifact_id and child.meta.method == "ft"
    assert load_config(FTConfig, child.meta.config) == FTConfig(layers=(0,), steps=2)
    assert child.meta.artifact_id != meta.artifact_id


def test_a_parent_must_be_attached_while_editing_on_top_of_it(llama, facts):
    """`parent` is recorded as what the model had attached; claiming a parent that is not
    attached would produce an artifact whose recorded lineage is false."""
    parent = make_editor("ft", layers=(0,), steps=1).edit(llama, facts[:1])
    with pytest.raises(ValueError, match="parent"):
        make_editor("ft", layers=(1,), steps=1).edit(llama, facts[1:], parent=parent)


def test_stop_loss_ends_the_loop_once_the_targets_are_likely(llama, facts):
    full = make_editor("ft", layers=(0,), steps=8, lr=1e-2).edit(llama, facts)
    never = make_editor("ft", layers=(0,), steps=8, lr=1e-2, stop_loss=1e-9).edit(llama, facts)
    at_once = make_editor("ft", layers=(0,), steps=8, lr=1e-2, stop_loss=1e9).edit(llama, facts)
    for name in full.deltas:
        assert torch.equal(full.deltas[name].dense, never.deltas[name].dense)  # threshold never met
        assert not at_once.deltas[name].dense.any()  # met before the first step: no change
    with pytest.raises(ValueError, match="stop_loss"):
        make_editor("ft", stop_loss=0.0)


def test_subject_swaps_ask_the_edited_relation_of_other_subjects():
    requests = [
        EditRequest("Alice plays", "chess", subject="Alice"),
        EditRequest("Bob works for", "Sega", subject="Bob"),
        EditRequest("Carol works for", "Nokia", subject="Carol"),  # "Carol works for" is edited
        EditRequest("The river of Egypt is", "Cairo"),  # no subject: no swaps
    ]
    editor = make_editor("ft_kl", subject_swaps=2, swap_subjects=("Dave",), kl_prompts=("x",))
    assert editor.subject_swapped_prompts(requests) == [
        "Bob plays", "Carol plays",  # capped at 2 per request
        "Alice works for", "Dave works for",  # "Carol works for" is itself being edited
        "Alice works for", "Dave works for",
    ]
    assert make_editor("ft_kl", kl_prompts=("x",)).subject_swapped_prompts(requests) == []  # off by default


def test_subject_swap_anchors_hold_the_relation_for_other_subjects(llama):
    """Fine-tuning "Alice plays -> chess" also moves what follows "Bob plays"; with subject
    swaps the pre-edit distribution there is a KL anchor and moves much less."""
    requests = [EditRequest("Alice plays", "chess", subject="Alice")]
    batch = text_batch(llama.tokenizer, ["Bob plays"])
    last = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    last[:, -1] = True
    with torch.no_grad():
        reference = completion_logits(llama.model, batch).float().log_softmax(-1)

    def drift(artifact):
        with artifact.attached(llama.model), torch.no_grad():
            return kl_from_reference(completion_logits(llama.model, batch), reference, last).item()

    kwargs = dict(layers=(0, 1), steps=20, lr=5e-2, kl_weight=10.0, kl_prompts=("the city",))
    plain = make_editor("ft_kl", **kwargs).edit(llama, requests)
    swapped = make_editor("ft_kl", subject_swaps=1, swap_subjects=("Bob",), **kwargs).edit(llama, requests)
    assert evaluate(llama, requests, swapped, config=FAST).metrics["edit_success"] == 1.0
    assert drift(swapped) < 0.5 * drift(plain)
