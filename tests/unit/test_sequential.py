"""Sequential sessions (GRACE codebook, folded FT deltas) and the lifelong stream runner."""

from __future__ import annotations

import pytest
import torch

from editing_core.data import EditRequest
from editing_core.editors import make_editor
from editing_core.sequential import StreamConfig, run_stream
from tests.conftest import same_state, snapshot

STREAM = [
    EditRequest("The capital of France is", "Rome", rephrase=("France capital city is",)),
    EditRequest("Bob works for", "Nokia", rephrase=("Bob is born in",)),
    EditRequest("The language of Japan is", "German"),
    EditRequest("Alice plays the", "guitar", rephrase=("Alice plays",)),
    EditRequest("The river of Egypt is", "Oslo"),
]
UNRELATED = [("Carol plays the", "piano"), ("Dave works for", "Toyota"), ("The capital of Spain is", "Madrid")]


def test_folding_session_applies_each_edit_on_the_previous_and_restores(llama):
    state = snapshot(llama.model)
    editor = make_editor("ft", layers=(0, 1), steps=10, lr=1e-2)
    with editor.sequential(llama) as session:
        first = session.add(STREAM[0])
        after_one = {n: llama.model.get_parameter(n).detach().clone() for n in session.names}
        session.add(STREAM[1])
        artifact = session.artifact()
        assert first.action == "applied" and session.size is None
        assert not same_state(llama.model, state)
        assert [r.prompt for r in artifact.requests] == [r.prompt for r in STREAM[:2]]
    assert same_state(llama.model, state)
    with artifact.attached(llama.model):  # the artifact is the total change
        for name in after_one:
            total = llama.model.get_parameter(name).detach()
            assert not torch.equal(total, after_one[name])
    assert same_state(llama.model, state)


@pytest.mark.parametrize("method, settings", [
    ("grace", dict(layer=0, eps_init=1e-3, n_iter=200, lr=0.5)),
    ("ft", dict(layers=(0, 1), steps=5, lr=1e-2)),
])
def test_stream_records_checkpoints_and_leaves_the_model_unchanged(llama, method, settings):
    state = snapshot(llama.model)
    result = run_stream(llama, make_editor(method, **settings), STREAM, UNRELATED, StreamConfig(every=2, progress=False))
    assert [row["edits"] for row in result.series] == [2, 4, 5]
    for row in result.series:
        for key in ("err", "trr", "paraphrase", "newest_success"):
            assert 0.0 <= row[key] <= 1.0
        assert row["seconds_per_edit"] > 0
    assert sum(sum(row["actions"].values()) for row in result.series) == len(STREAM)
    assert len(result.outcomes) == len(STREAM) and result.summary["edits"] == len(STREAM)
    assert same_state(llama.model, state)
    if method == "grace":
        assert [row["size"] for row in result.series] == [2, 4, 5]
        assert [row["err"] for row in result.series] == [1.0, 1.0, 1.0]
        with result.artifact.attached(llama.model):
            from editing_core.evaluate import teacher_forced

            right = teacher_forced(llama.model, llama.tokenizer, [(r.prompt, r.target_new) for r in STREAM], 8)
            assert all(c.all() for c in right)


def test_trr_is_one_when_nothing_unrelated_moves(llama):
    result = run_stream(llama, make_editor("grace", layer=0, eps_init=1e-3), STREAM[:2], UNRELATED, StreamConfig(every=1, progress=False))
    assert [row["trr"] for row in result.series] == [1.0, 1.0]
