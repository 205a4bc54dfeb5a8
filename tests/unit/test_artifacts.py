"""The edit artifact: exact attach/detach, base checks, stacking, save/load, pickling."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open

from editing_core.artifacts import (
    FORMAT_VERSION,
    JSON_NAME,
    TENSORS_NAME,
    ArtifactError,
    ArtifactMeta,
    WeightDelta,
    WeightDeltaArtifact,
    load_artifact,
    weights_hash,
)
from editing_core.data import EditRequest
from editing_core.editors import make_editor
from editing_core.models.tiny import tiny_model
from tests.conftest import same_state, snapshot

REQUESTS = [
    EditRequest("Alice plays", "chess", subject="Alice", ground_truth="piano", rephrase=("Alice is", "Alice plays the"),
                locality_prompt="Bob works for", locality_answer="Sega", source="facts.jsonl line 1"),
    EditRequest("The capital of Japan is", "Zürich Oslo"),  # non-ASCII survives the JSON
]
PROBE = "The capital of France is Paris and Alice plays"


def logits(loaded, text: str = PROBE) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**ids).logits


def ft_artifact(loaded, requests=REQUESTS, layers=(0, 1), roles=("mlp_out", "attn_out"), parent=None, steps=3):
    return make_editor("ft", layers=layers, roles=roles, steps=steps, lr=5e-2).edit(loaded, requests, parent=parent)


def manual_artifact(loaded, deltas: dict[str, WeightDelta], parent: str | None = None) -> WeightDeltaArtifact:
    names = tuple(deltas)
    meta = ArtifactMeta(base_model=loaded.name, base_hash=weights_hash(loaded.model, names), hashed_params=names,
                        method="manual", config={"note": "test", "scale": 1.5}, requests=tuple(REQUESTS), parent=parent)
    return WeightDeltaArtifact(meta, deltas)


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request):
    return tiny_model(request.param)


# -- attach / detach ----------------------------------------------------------------------


def test_attach_changes_only_the_touched_params_and_detach_restores_bit_for_bit(tiny):
    base_state, base_logits = snapshot(tiny.model), logits(tiny)
    artifact = ft_artifact(tiny)
    assert same_state(tiny.model, base_state)  # the editor left the model alone
    assert set(artifact.deltas) == set(tiny.adapter.param_names(["mlp_out", "attn_out"], [0, 1]))

    artifact.attach(tiny.model)
    assert artifact.is_attached(tiny.model)
    edited = tiny.model.state_dict()
    for name in base_state:
        changed = not torch.equal(edited[name], base_state[name])
        assert changed == (name in artifact.deltas), name
    for name, delta in artifact.deltas.items():
        torch.testing.assert_close(edited[name], base_state[name] + delta.tensor())
    assert not torch.allclose(logits(tiny), base_logits)

    artifact.detach(tiny.model)
    assert not artifact.is_attached(tiny.model)
    assert same_state(tiny.model, base_state)
    assert torch.equal(logits(tiny), base_logits)


def test_detach_restores_even_where_subtracting_the_delta_would_not(llama):
    """w + 1e8 - 1e8 != w in float32: detach must copy the originals back, not subtract."""
    name = llama.adapter.param_name("mlp_out", 0)
    param = llama.model.get_parameter(name)
    delta = torch.full_like(param, 1e8)
    assert not torch.equal(param + delta - delta, param)  # the trap is real
    base_state = snapshot(llama.model)
    artifact = manual_artifact(llama, {name: WeightDelta(dense=delta)})
    artifact.attach(llama.model)
    artifact.detach(llama.model)
    assert same_state(llama.model, base_state)


def test_attached_context_restores_even_when_the_body_raises(tiny):
    base_state, base_logits = snapshot(tiny.model), logits(tiny)
    artifact = ft_artifact(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with artifact.attached(tiny.model) as model:
            assert model is tiny.model and artifact.is_attached(tiny.model)
            assert not torch.equal(logits(tiny), base_logits)
            raise RuntimeError("boom")
    assert not artifact.is_attached(tiny.model)
    assert same_state(tiny.model, base_state)
    assert torch.equal(logits(tiny), base_logits)


def test_attaching_twice_raises_and_changes_nothing(llama):
    artifact = ft_artifact(llama)
    artifact.attach(llama.model)
    edited = snapshot(llama.model)
    with pytest.raises(ArtifactError, match="already attached"):
        artifact.attach(llama.model)
    assert same_state(llama.model, edited)
    artifact.detach(llama.model)


def test_detaching_when_not_attached_raises(llama):
    artifact = ft_artifact(llama)
    with pytest.raises(ArtifactError, match=f"{artifact.meta.artifact_id} is not attached"):
        artifact.detach(llama.model)
    artifact.attach(llama.model)
    artifact.detach(llama.model)
    with pytest.raises(ArtifactError, match="not attached"):
        artifact.detach(llama.model)


def test_attaching_to_other_weights_raises_and_names_the_mismatch(llama):
    artifact = ft_artifact(llama)
    other = tiny_model("llama", seed=1)
    other_state = snapshot(other.model)
    with pytest.raises(ArtifactError) as info:
        artifact.attach(other.model)
    message = str(info.value)
    assert artifact.meta.artifact_id in message and "computed on other weights" in message
    assert artifact.meta.base_hash[:12] in message
    assert weights_hash(other.model, artifact.meta.hashed_params)[:12] in message
    assert "'tiny-llama'" in message and "ft" in message
    assert same_state(other.model, other_state) and not artifact.is_attached(other.model)
    # the same weights under another object are fine: the check is on content, not identity
    twin = tiny_model("llama", seed=0)
    with artifact.attached(twin.model):
        twin_logits = logits(twin)
    with artifact.attached(llama.model):
        assert torch.equal(logits(llama), twin_logits)


def test_attaching_to_another_architecture_names_the_missing_parameter(llama, gpt2):
    artifact = ft_artifact(llama)
    with pytest.raises(ArtifactError, match="has no parameter 'model.layers"):
        artifact.attach(gpt2.model)


def test_weights_hash_sees_one_bit_and_ignores_name_order(llama):
    names = llama.adapter.param_names(["mlp_in", "mlp_out"], [0])
    digest = weights_hash(llama.model, names)
    assert digest == weights_hash(llama.model, list(reversed(names)))
    param = llama.model.get_parameter(names[0])
    with torch.no_grad():
        bits = param.view(torch.int32)
        bits[0, 0] ^= 1  # flip the lowest mantissa bit of one weight
    assert weights_hash(llama.model, names) != digest
    with pytest.raises(ArtifactError, match="no parameter 'nope'"):
        weights_hash(llama.model, ["nope"])


# -- weight deltas ------------------------------------------------------------------------


def test_weight_delta_is_dense_xor_low_rank():
    m = torch.ones(4, 3)
    with pytest.raises(ValueError):
        WeightDelta()
    with pytest.raises(ValueError):
        WeightDelta(dense=m, left=torch.ones(4, 1), right=torch.ones(1, 3))
    with pytest.raises(ValueError):
        WeightDelta(left=torch.ones(4, 1))
    low = WeightDelta(left=torch.ones(4, 2), right=torch.full((2, 3), 0.5))
    assert low.rank == 2 and torch.equal(low.tensor(), torch.full((4, 3), 1.0))
    assert low.num_bytes() == (8 + 6) * 4 and WeightDelta(dense=m).num_bytes() == 12 * 4
    assert WeightDelta(dense=m).rank is None


def test_deltas_outside_the_hashed_params_are_refused(llama):
    name = llama.adapter.param_name("mlp_out", 0)
    meta = ArtifactMeta(base_model="x", base_hash="0", hashed_params=(), method="m", config={}, requests=())
    with pytest.raises(ArtifactError, match="outside the hashed set"):
        WeightDeltaArtifact(meta, {name: WeightDelta(dense=torch.zeros(1))})


# -- save / load --------------------------------------------------------------------------


def test_save_load_round_trip(tiny, tmp_path):
    artifact = ft_artifact(tiny)
    with artifact.attached(tiny.model):
        edited_logits = logits(tiny)
    path = artifact.save(tmp_path / "runs" / "edit-1")
    assert path == tmp_path / "runs" / "edit-1"
    assert sorted(p.name for p in path.iterdir()) == [JSON_NAME, TENSORS_NAME]
    assert [p.name for p in path.parent.iterdir()] == ["edit-1"]  # no staging dir left behind

    document = json.loads((path / JSON_NAME).read_text(encoding="utf-8"))
    assert document["format_version"] == FORMAT_VERSION and document["kind"] == "weight_delta"
    assert "Zürich" in (path / JSON_NAME).read_text(encoding="utf-8")
    with safe_open(str(path / TENSORS_NAME), framework="pt") as f:  # plain safetensors, no pickle
        assert set(f.keys()) == {f"{name}::dense" for name in artifact.deltas}

    loaded = load_artifact(path)
    assert type(loaded) is WeightDeltaArtifact
    assert loaded.meta == artifact.meta  # every field: requests, method, config, hashes, parent, id, time
    assert loaded.requests == tuple(REQUESTS)
    assert loaded.meta.config == artifact.meta.config and loaded.meta.method == "ft"
    assert loaded.deltas.keys() == artifact.deltas.keys()
    for name, delta in artifact.deltas.items():
        assert torch.equal(loaded.deltas[name].dense, delta.dense)
        assert loaded.deltas[name].dense.dtype == delta.dense.dtype
    base_state = snapshot(tiny.model)
    with loaded.attached(tiny.model):
        assert torch.equal(logits(tiny), edited_logits)
    assert same_state(tiny.model, base_state)


def test_metadata_with_parent_round_trips(llama, tmp_path):
    name = llama.adapter.param_name("mlp_in", 1)
    artifact = manual_artifact(llama, {name: WeightDelta(dense=torch.randn(64, 32))}, parent="abc123")
    loaded = load_artifact(artifact.save(tmp_path / "a"))
    assert loaded.meta.parent == "abc123"
    assert loaded.meta == artifact.meta
    assert loaded.meta.versions["editflow"] and loaded.meta.versions["torch"] == torch.__version__


def test_low_rank_round_trip(tiny, tmp_path):
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for role in ("mlp_in", "attn_out"):
        name = tiny.adapter.param_name(role, -1)
        rows, cols = tiny.model.get_parameter(name).shape  # storage orientation (Conv1D: in x out)
        deltas[name] = WeightDelta(left=torch.randn(rows, 2, generator=generator), right=torch.randn(2, cols, generator=generator) * 0.1)
    artifact = manual_artifact(tiny, deltas)
    base_state, base_logits = snapshot(tiny.model), logits(tiny)
    with artifact.attached(tiny.model):
        edited_logits = logits(tiny)
        for name, delta in deltas.items():
            torch.testing.assert_close(tiny.model.get_parameter(name), base_state[name] + delta.left @ delta.right)
    assert not torch.allclose(edited_logits, base_logits)

    path = artifact.save(tmp_path / "low")
    document = json.loads((path / JSON_NAME).read_text())
    assert set(document["data"]["params"].values()) == {"rank-2"}
    loaded = load_artifact(path)
    for name, delta in deltas.items():
        assert loaded.deltas[name].dense is None and loaded.deltas[name].rank == 2
        assert torch.equal(loaded.deltas[name].left, delta.left) and torch.equal(loaded.deltas[name].right, delta.right)
    with loaded.attached(tiny.model):
        assert torch.equal(logits(tiny), edited_logits)
    assert same_state(tiny.model, base_state)


def test_save_over_an_existing_artifact_replaces_both_files(llama, tmp_path):
    low_name = llama.adapter.param_name("mlp_in", 0)
    first = manual_artifact(llama, {low_name: WeightDelta(left=torch.ones(64, 1), right=torch.ones(1, 32))})
    second = ft_artifact(llama, layers=(1,), roles=("mlp_out",))
    path = tmp_path / "art"
    first.save(path)
    second.save(path)
    assert sorted(p.name for p in path.iterdir()) == [JSON_NAME, TENSORS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    loaded = load_artifact(path)
    assert loaded.meta == second.meta
    with safe_open(str(path / TENSORS_NAME), framework="pt") as f:
        assert set(f.keys()) == {f"{llama.adapter.param_name('mlp_out', 1)}::dense"}


def test_saved_directory_gets_ordinary_permissions(llama, tmp_path):
    """The artifact dir is created through a private temp dir (mode 0700); once in place it
    should have the same mode as any directory made under the current umask, so that a
    shared artifact store (MLflow, Serve replicas under another user) can read it."""
    old = os.umask(0o022)
    try:
        path = manual_artifact(llama, {llama.adapter.param_name("mlp_out", 0): WeightDelta(dense=torch.zeros(32, 64))}).save(tmp_path / "perm")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert (path / JSON_NAME).stat().st_mode & 0o777 == 0o644


def _saved(llama, tmp_path):
    return manual_artifact(llama, {llama.adapter.param_name("mlp_out", 0): WeightDelta(dense=torch.zeros(32, 64))}).save(tmp_path / "a")


def test_load_errors_are_artifact_errors_with_a_reason(llama, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError, match=f"{empty} is not an edit artifact: {JSON_NAME} is missing"):
        load_artifact(empty)

    path = _saved(llama, tmp_path)
    document = json.loads((path / JSON_NAME).read_text())

    (path / JSON_NAME).write_text(json.dumps({**document, "kind": "nope"}))
    with pytest.raises(ArtifactError, match=r"unknown artifact kind 'nope'; known: \[.*'weight_delta'.*\]"):
        load_artifact(path)

    (path / JSON_NAME).write_text(json.dumps({**document, "format_version": 99}))
    with pytest.raises(ArtifactError, match="unsupported format_version 99"):
        load_artifact(path)

    (path / JSON_NAME).write_text(json.dumps({k: v for k, v in document.items() if k != "format_version"}))
    with pytest.raises(ArtifactError, match="unsupported format_version None"):
        load_artifact(path)

    (path / JSON_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(path)


def test_missing_tensors_file_is_an_artifact_error(llama, tmp_path):
    path = _saved(llama, tmp_path)
    (path / TENSORS_NAME).unlink()
    with pytest.raises(ArtifactError, match=TENSORS_NAME):
        load_artifact(path)


# -- stacking -----------------------------------------------------------------------------


def test_stacked_edit_attaches_only_on_top_of_its_parent(llama):
    base_state = snapshot(llama.model)
    a = ft_artifact(llama, requests=REQUESTS[:1], layers=(0,), roles=("mlp_out",))
    a.attach(llama.model)
    a_state, a_logits = snapshot(llama.model), logits(llama)
    b = ft_artifact(llama, requests=REQUESTS[1:], layers=(0,), roles=("mlp_out",), parent=a)
    assert same_state(llama.model, a_state)  # computing B left A's model alone
    assert b.meta.parent == a.meta.artifact_id
    a.detach(llama.model)

    with pytest.raises(ArtifactError) as info:
        b.attach(llama.model)
    assert f"parent artifact {a.meta.artifact_id}" in str(info.value)
    assert same_state(llama.model, base_state)

    a.attach(llama.model)
    b.attach(llama.model)
    assert not torch.equal(logits(llama), a_logits)
    b.detach(llama.model)
    assert same_state(llama.model, a_state)
    a.detach(llama.model)
    assert same_state(llama.model, base_state)


def test_stacked_edit_on_other_params_still_needs_its_parent(llama):
    """B edits layer 1, its parent A layer 0. B's numbers were computed with A in place, so
    B must not attach to the bare base model (its hash has to cover the parent's params too)."""
    a = ft_artifact(llama, requests=REQUESTS[:1], layers=(0,), roles=("mlp_out",))
    with a.attached(llama.model):
        b = ft_artifact(llama, requests=REQUESTS[1:], layers=(1,), roles=("mlp_out",), parent=a)
    base_state = snapshot(llama.model)
    try:
        with pytest.raises(ArtifactError, match="parent"):
            b.attach(llama.model)
    finally:
        if b.is_attached(llama.model):
            b.detach(llama.model)
    assert same_state(llama.model, base_state)
    with a.attached(llama.model), b.attached(llama.model):
        pass
    assert same_state(llama.model, base_state)


# -- pickling -----------------------------------------------------------------------------


def test_pickle_round_trip_drops_attachments(llama):
    artifact = ft_artifact(llama)
    artifact.attach(llama.model)
    copy = pickle.loads(pickle.dumps(artifact))
    assert artifact.is_attached(llama.model)
    assert not copy.is_attached(llama.model)
    with pytest.raises(ArtifactError, match="not attached"):
        copy.detach(llama.model)
    assert copy.meta == artifact.meta
    assert all(torch.equal(copy.deltas[n].dense, d.dense) for n, d in artifact.deltas.items())
    twin = tiny_model("llama", seed=0)
    twin_state = snapshot(twin.model)
    with copy.attached(twin.model):
        assert torch.equal(logits(twin), logits(llama))
    assert same_state(twin.model, twin_state)
    artifact.detach(llama.model)


def test_detaching_a_parent_under_its_child_is_refused(llama):
    """Detach restores the copy taken at attach time; done out of order (A under B) it would
    silently write A's originals over B's change and B's detach would then put A back: the
    model would end edited with nothing attached. It must refuse and change nothing."""
    base_state = snapshot(llama.model)
    a = ft_artifact(llama, requests=REQUESTS[:1], layers=(0,), roles=("mlp_out",))
    a.attach(llama.model)
    b = ft_artifact(llama, requests=REQUESTS[1:], layers=(0,), roles=("mlp_out",), parent=a)
    b.attach(llama.model)
    stacked = snapshot(llama.model)
    try:
        with pytest.raises(ArtifactError):
            a.detach(llama.model)
        assert same_state(llama.model, stacked)
    finally:  # whatever happened above, unwind so the final check is meaningful
        for artifact in (b, a):
            if artifact.is_attached(llama.model):
                artifact.detach(llama.model)
    assert same_state(llama.model, base_state)
