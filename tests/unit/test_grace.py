"""GRACE codebook adaptor on tiny models: the three codebook cases, lookup, deletion by id,
exact detach, artifact round trip, stacking, the cached value path, and two regression bugs of
a popular port (labels misaligned with keys; nested edit-id lists breaking deletion)."""

from __future__ import annotations

import pytest
import torch

from editing_core.artifacts import ArtifactError, load_artifact
from editing_core.data import EditRequest
from editing_core.editors import make_editor
from editing_core.editors.grace import (
    Codebook,
    GraceArtifact,
    _capture,
    _run_above,
    active_codebook,
    position_queries,
    replaced_positions,
)
from editing_core.evaluate import teacher_forced
from editing_core.models.tiny import TINY_CONFIGS, tiny_model
from editing_core.tokens import completion_ids
from tests.conftest import same_state, snapshot

CAUSAL = [t for t in TINY_CONFIGS if t != "bert"]
# single-token targets: on a 2-layer random model a value at one position moves that position's
# prediction reliably; later tokens depend on weak random attention
REQUESTS = [
    EditRequest("The capital of France is", "Rome", subject="France"),
    EditRequest("Bob works for", "Nokia", subject="Bob"),
    EditRequest("The language of Japan is", "German", subject="Japan"),
    EditRequest("Alice plays the", "guitar", subject="Alice"),
]
PROBE = "Carol works for Sega and the river of Egypt is"


def grace(**overrides):
    settings = dict(layer=0, eps_init=1e-3, n_iter=200, lr=0.5)
    settings.update(overrides)
    return make_editor("grace", **settings)


def logits(loaded, text=PROBE):
    with torch.no_grad():
        return loaded.model(**loaded.tokenizer(text, return_tensors="pt")).logits


def accuracy(loaded, requests):
    pairs = [(r.prompt, r.target_new) for r in requests]
    return [c.float().mean().item() for c in teacher_forced(loaded.model, loaded.tokenizer, pairs, 4)]


def key_query(loaded, request, layer=0, role="mlp_out"):
    """The wrapped module's input at the last prompt token of `request`."""
    module = loaded.adapter.module(role, layer)
    ids = loaded.tokenizer(request.prompt, return_tensors="pt").input_ids
    return _capture(loaded, loaded.adapter.resolve_layers([layer])[0], module, ids).inputs[0, -1]


# -- the three codebook cases --------------------------------------------------------------


def test_far_queries_add_keys_with_the_initial_radius(llama):
    with grace(eps_init=1e-3).sequential(llama) as session:
        outcomes = [session.add(r) for r in REQUESTS]
        codebook = session.codebook
        assert [o.action for o in outcomes] == ["added"] * 4
        assert session.size == 4 and torch.equal(codebook.radii, torch.full((4,), 1e-3))
        for request, key in zip(REQUESTS, codebook.keys):
            assert torch.allclose(key, key_query(llama, request), atol=1e-6)
        assert accuracy(llama, REQUESTS) == [1.0] * 4


def test_a_query_inside_a_ball_with_another_label_splits_it_so_the_balls_just_touch(llama):
    first, second = REQUESTS[0], EditRequest(REQUESTS[0].prompt + " the", "Oslo")
    distance = (key_query(llama, first) - key_query(llama, second)).norm().item()
    with grace(eps_init=10 * distance).sequential(llama) as session:
        session.add(first)
        outcome = session.add(second)
        codebook = session.codebook
        assert outcome.action == "split" and outcome.key_index == 1 and session.size == 2
        assert codebook.radii.tolist() == pytest.approx([distance / 2, distance / 2], rel=1e-5)
        assert codebook.radii.sum().item() == pytest.approx(distance, rel=1e-5)  # they touch
        assert accuracy(llama, [first, second]) == [1.0, 1.0]


def test_a_query_inside_a_ball_with_the_same_label_expands_it(llama):
    first, second = REQUESTS[0], EditRequest(REQUESTS[0].prompt + " the", "Rome")
    distance = (key_query(llama, first) - key_query(llama, second)).norm().item()
    with grace(eps_init=10 * distance).sequential(llama) as session:
        session.add(first)
        outcome = session.add(second)
        codebook = session.codebook
        assert outcome.action == "expanded" and session.size == 1
        assert codebook.radii[0].item() == pytest.approx(max(10 * distance, distance))
        assert codebook.edit_ids == [[first.digest(), second.digest()]]
        assert accuracy(llama, [first, second]) == [1.0, 1.0]


def test_labels_are_compared_by_token_ids(llama):
    first = REQUESTS[0]
    second = EditRequest(first.prompt + " the", " Rome ")  # same tokens, other spelling
    assert completion_ids(llama.tokenizer, first.prompt, first.target_new)[1] == completion_ids(
        llama.tokenizer, second.prompt, second.target_new)[1]
    with grace(eps_init=1e3).sequential(llama) as session:
        session.add(first)
        assert session.add(second).action == "expanded"


def test_only_on_error_skips_what_the_model_already_answers(llama):
    with grace(only_on_error=True).sequential(llama) as session:
        session.add(REQUESTS[0])
        outcome = session.add(REQUESTS[0])
        assert outcome.action == "skipped" and session.size == 1


# -- lookup ------------------------------------------------------------------------------------


def test_replaced_positions_for_each_mode():
    hits = torch.tensor([[False, True, False, False], [False, False, False, False]])
    where, source = replaced_positions(hits, "last")
    assert where.tolist() == hits.tolist() and source[0].tolist() == [0, 1, 2, 3]
    where, source = replaced_positions(hits, "prompt")
    assert where.tolist() == [[True, True, False, False], [False] * 4] and source[0].tolist() == [1] * 4
    where, source = replaced_positions(hits, "all")
    assert where.tolist() == [[True] * 4, [False] * 4]


def test_prompt_mean_queries_ignore_left_padding():
    x = torch.randn(1, 3, 5)
    padded = torch.cat([torch.randn(1, 2, 5), x], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    plain = position_queries(x, None, "prompt_mean")
    assert torch.allclose(position_queries(padded, mask, "prompt_mean")[:, 2:], plain, atol=1e-6)
    assert torch.allclose(plain[0, -1], x[0].mean(0))
    assert position_queries(x, None, "last_prompt") is x


@pytest.mark.parametrize("key_token", ["last_prompt", "prompt_mean"])
def test_the_value_replaces_the_module_output_at_the_matching_position_only(llama, key_token):
    artifact = grace(key_token=key_token).edit(llama, REQUESTS[:1])
    module = llama.adapter.module("mlp_out", 0)
    ids = llama.tokenizer(REQUESTS[0].prompt + " Rome", return_tensors="pt").input_ids

    def module_output():  # hooks run in registration order: this one runs after the adaptor's
        seen = {}
        handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach().clone()))
        try:
            with torch.no_grad():
                llama.model(input_ids=ids)
        finally:
            handle.remove()
        return seen["out"]

    before = module_output()
    with artifact.attached(llama.model):
        after = module_output()
    last_prompt = ids.shape[1] - 2
    changed = (after != before).any(-1)[0]
    assert changed.tolist() == [i == last_prompt for i in range(ids.shape[1])]
    assert torch.equal(after[0, last_prompt], artifact.codebook.values[0])


@pytest.mark.parametrize("model_type", CAUSAL)
def test_cached_layers_above_give_the_full_forward_logits(model_type):
    loaded = tiny_model(model_type)
    ids = loaded.tokenizer(PROBE, return_tensors="pt").input_ids
    for layer in range(loaded.adapter.num_layers):
        capture = _capture(loaded, layer, loaded.adapter.module("mlp_out", layer), ids)
        with torch.no_grad():
            assert torch.allclose(_run_above(loaded, capture), capture.logits, atol=1e-6)


@pytest.mark.parametrize("model_type", CAUSAL)
def test_every_architecture_edits_and_detaches_exactly(model_type):
    loaded = tiny_model(model_type)
    state, before = snapshot(loaded.model), logits(loaded)
    artifact = grace(role="mlp_out", n_iter=5).edit(loaded, REQUESTS[:2])
    assert same_state(loaded.model, state) and torch.equal(logits(loaded), before)
    artifact.attach(loaded.model)
    artifact.detach(loaded.model)
    assert torch.equal(logits(loaded), before) and not loaded.model._forward_hooks
    assert active_codebook(loaded.adapter.module("mlp_out", 0)) is None


def test_cache_and_full_forward_learn_the_same_value(llama):
    cached = grace(cache_activations=True).edit(llama, REQUESTS[:2])
    full = grace(cache_activations=False).edit(llama, REQUESTS[:2])
    assert torch.allclose(cached.codebook.values, full.codebook.values, atol=1e-4)


# -- attach, detach, save, load ------------------------------------------------------------------


def test_detach_restores_base_outputs_bit_for_bit_and_generation_uses_the_edit(llama):
    before = logits(llama)
    artifact = grace().edit(llama, REQUESTS)
    with artifact.attached(llama.model):
        assert accuracy(llama, REQUESTS) == [1.0] * 4
        ids = llama.tokenizer(REQUESTS[1].prompt, return_tensors="pt").input_ids
        generated = llama.model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=llama.tokenizer.pad_token_id)
        assert llama.tokenizer.decode(generated[0, -1:]).strip() == "Nokia"
    assert torch.equal(logits(llama), before)
    for module in llama.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_artifact_round_trip_gives_identical_outputs(llama, tmp_path):
    artifact = grace(key_token="prompt_mean", replace="prompt").edit(llama, REQUESTS)
    artifact.save(tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    assert isinstance(loaded, GraceArtifact) and loaded.edit_ids == artifact.edit_ids
    assert loaded.codebook.labels == artifact.codebook.labels and loaded.replace_mode == "prompt"
    text = REQUESTS[2].prompt + " German and " + PROBE
    with artifact.attached(llama.model):
        expected = logits(llama, text)
    with loaded.attached(llama.model):
        assert torch.equal(logits(llama, text), expected)


def test_attach_checks_the_base_weights(llama):
    artifact = grace().edit(llama, REQUESTS[:1])
    other = tiny_model("llama", seed=1)
    with pytest.raises(ArtifactError, match="other weights"):
        artifact.attach(other.model)


def test_a_child_codebook_supersedes_its_parent_and_detach_order_is_enforced(llama):
    parent = grace().edit(llama, REQUESTS[:2])
    with parent.attached(llama.model):
        child = grace().edit(llama, REQUESTS[2:], parent=parent)
    assert len(child.codebook) == 4 and child.meta.parent == parent.meta.artifact_id
    assert [r.prompt for r in child.requests] == [r.prompt for r in REQUESTS[2:]]
    parent.attach(llama.model)
    child.attach(llama.model)
    assert accuracy(llama, REQUESTS) == [1.0] * 4
    with pytest.raises(ArtifactError, match="reverse order"):
        parent.detach(llama.model)
    child.detach(llama.model)
    assert accuracy(llama, REQUESTS[:2]) == [1.0, 1.0]  # the parent's codebook answers again
    assert active_codebook(llama.adapter.module("mlp_out", 0)) is parent.codebook or len(
        active_codebook(llama.adapter.module("mlp_out", 0))) == 2
    parent.detach(llama.model)


# -- deletion by id ----------------------------------------------------------------------------


def test_deleting_one_edit_keeps_the_others_working(llama):
    before = logits(llama)
    artifact = grace().edit(llama, REQUESTS)
    gone = REQUESTS[1]
    smaller = artifact.without_edits([gone.digest()])
    assert len(smaller.codebook) == 3 and gone.digest() not in smaller.edit_ids
    assert len(artifact.codebook) == 4  # the original is untouched
    assert gone not in smaller.requests and smaller.meta.artifact_id != artifact.meta.artifact_id
    pre = accuracy(llama, [gone])
    with smaller.attached(llama.model):
        assert accuracy(llama, [REQUESTS[0], REQUESTS[2], REQUESTS[3]]) == [1.0] * 3
        assert accuracy(llama, [gone]) == pre  # back to the base model's answer
    assert torch.equal(logits(llama), before)
    with pytest.raises(ArtifactError, match="no edit"):
        artifact.without_edits(["nope"])


def test_regression_deletion_works_after_the_second_edit_and_with_shared_keys(llama):
    """A popular port stored edit ids as nested lists, so deleting failed after the second edit."""
    same_label = [EditRequest(REQUESTS[0].prompt + " the" * i, "Rome") for i in range(3)]
    with grace(eps_init=1e3).sequential(llama) as session:
        for request in same_label + REQUESTS[1:3]:
            session.add(request)
        artifact = session.artifact()
    codebook = artifact.codebook
    assert all(isinstance(i, str) for ids in codebook.edit_ids for i in ids)
    ids = artifact.edit_ids
    assert len(ids) == 5
    for count, edit_id in enumerate(ids, start=1):  # delete them all, one at a time
        artifact = artifact.without_edits([edit_id])
        assert len(artifact.edit_ids) == 5 - count
    assert len(artifact.codebook) == 0
    with artifact.attached(llama.model):
        pass


def test_regression_labels_stay_aligned_with_keys(llama, tmp_path):
    """A popular port prepended labels while appending keys: key i then answered with label j."""
    artifact = grace(eps_init=1e-3).edit(llama, REQUESTS)
    artifact.save(tmp_path / "a")
    for codebook in (artifact.codebook, load_artifact(tmp_path / "a").codebook):
        for request in REQUESTS:
            _, index = codebook.nearest(key_query(llama, request).unsqueeze(0))
            assert codebook.labels[index.item()] == tuple(completion_ids(llama.tokenizer, request.prompt, request.target_new)[1])
            assert codebook.edit_ids[index.item()] == [request.digest()]
    broken = Codebook(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2), [(1,)], [["a"], ["b"]])
    with pytest.raises(ArtifactError, match="disagree"):
        broken.check()


# -- sequential sessions and the stream ------------------------------------------------------------


def test_session_forget_and_model_restored(llama):
    before = logits(llama)
    with grace().sequential(llama) as session:
        for request in REQUESTS:
            session.add(request)
        session.forget(REQUESTS[0].digest())
        assert session.size == 3 and REQUESTS[0] not in session.artifact().requests
        with pytest.raises(KeyError):
            session.forget(REQUESTS[0].digest())
    assert torch.equal(logits(llama), before)
