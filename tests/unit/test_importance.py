"""Head / FFN importance: gates, gradient sums, ablation, pruning, task files (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch

from editing_core.artifacts import load_artifact
from editing_core.importance import (
    Example, ImportanceConfig, ImportanceSums, Task, TaskError, TaskRow, ablation_scores, gate_gradients, gated,
    importance_sums, iterative_head_masks, kshot_prompt, load_task, load_tasks, plot_ffn_bars, plot_head_heatmap,
    plot_pruning_curves, prune_masks, pruned_artifact, pruning_curve, select_rows, task_accuracy,
)
from editing_core.models.tiny import TINY_CONFIGS, tiny_model
from editing_core.tokens import completion_batch
from tests.conftest import same_state, snapshot

ARCHS = sorted(TINY_CONFIGS)
PAIRS = [("France", "Paris"), ("Italy", "Rome"), ("England", "London"), ("Germany", "Berlin"),
         ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
         ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Bob", "works for Sega"), ("Alice", "plays chess")]


def tiny_rows(n: int = len(PAIRS)) -> list[TaskRow]:
    """Rows over the tiny tokenizer's words; each row's 5 examples are the next 5 pairs."""
    rows = []
    for i, (query, answer) in enumerate(PAIRS[:n]):
        examples = tuple(Example(*PAIRS[(i + j) % len(PAIRS)]) for j in range(1, 6))
        rows.append(TaskRow("the capital city of the country", examples, query, answer))
    return rows


def logits_of(loaded, rows, shots=2):
    batch = completion_batch(loaded.tokenizer, [(kshot_prompt(r, shots), r.answer) for r in rows])
    with torch.no_grad():
        return loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def random_gates(loaded, seed=0):
    generator = torch.Generator().manual_seed(seed)
    adapter = loaded.adapter
    head_gate = (torch.rand(adapter.num_layers, adapter.num_heads, generator=generator) > 0.5).float()
    head_gate[0, 0], head_gate[-1, -1] = 0, 1  # at least one removed, one kept
    ffn_gate = torch.tensor([0.0] + [1.0] * (adapter.num_layers - 1))
    return head_gate, ffn_gate


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# -- gates ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_all_ones_gates_leave_logits_bit_identical(arch):
    loaded = tiny_model(arch)
    rows = tiny_rows(4)
    before = logits_of(loaded, rows)
    adapter = loaded.adapter
    with gated(loaded, torch.ones(adapter.num_layers, adapter.num_heads), torch.ones(adapter.num_layers)):
        inside = logits_of(loaded, rows)
    assert torch.equal(inside, before)


def test_gates_change_the_output_and_hooks_are_removed_on_error(llama):
    rows = tiny_rows(3)
    before = logits_of(llama, rows)
    head_gate, ffn_gate = random_gates(llama)
    with pytest.raises(RuntimeError, match="boom"):
        with gated(llama.model, head_gate, ffn_gate):  # a bare model works too
            assert not torch.allclose(logits_of(llama, rows), before)
            raise RuntimeError("boom")
    modules = [llama.adapter.module(role, layer) for role in ("attn_out", "mlp_out") for layer in range(2)]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in modules)
    assert torch.equal(logits_of(llama, rows), before)


def test_gate_shapes_are_checked(llama):
    with pytest.raises(ValueError, match=r"\(layers, heads\) = \(2, 4\)"):
        with gated(llama, torch.ones(2, 2)):
            pass


# -- gates as weights -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_artifact_equals_gated_model_and_detaches_exactly(arch):
    loaded = tiny_model(arch)
    rows = tiny_rows(4)
    head_gate, ffn_gate = random_gates(loaded)
    with gated(loaded, head_gate, ffn_gate):
        expected = logits_of(loaded, rows)
    state = snapshot(loaded.model)
    artifact = pruned_artifact(loaded, head_gate, ffn_gate)
    assert artifact.meta.method == "prune" and artifact.meta.requests == ()
    assert artifact.meta.config["ffn"] == [0] and [0, 0] in artifact.meta.config["heads"]
    with artifact.attached(loaded.model):
        attached = logits_of(loaded, rows)
        out_in = loaded.adapter.as_out_in(loaded.adapter.weight("attn_out", 0))
        width = loaded.adapter.head_dim
        assert torch.count_nonzero(out_in[:, :width]) == 0  # head 0 of layer 0: its input columns
        assert torch.count_nonzero(loaded.adapter.weight("mlp_out", 0)) == 0
    torch.testing.assert_close(attached, expected, rtol=1e-5, atol=1e-5)
    assert same_state(loaded.model, state)


def test_pruned_artifact_saves_and_loads(llama, tmp_path):
    head_gate, ffn_gate = random_gates(llama)
    artifact = pruned_artifact(llama, head_gate, ffn_gate)
    loaded_back = load_artifact(artifact.save(tmp_path / "prune"))
    assert loaded_back.meta.config == artifact.meta.config and loaded_back.meta.requests == ()
    with loaded_back.attached(llama.model):
        assert torch.count_nonzero(llama.adapter.weight("mlp_out", 0)) == 0


def test_pruned_artifact_refuses_fractional_gates(llama):
    with pytest.raises(ValueError, match="only 0"):
        pruned_artifact(llama, torch.full((2, 4), 0.5), None)


# -- gradient sums ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
def test_token_sums_equal_the_scalar_gate_gradient(arch):
    loaded = tiny_model(arch)
    rows = tiny_rows(6)
    sums = importance_sums(loaded, rows, 2, ImportanceConfig(batch_size=4))
    head_grad, ffn_grad = gate_gradients(loaded, rows, 2, batch_size=3)
    assert relative_error(sums.head_sum, head_grad) < 1e-4
    assert relative_error(sums.ffn_sum, ffn_grad) < 1e-4
    # per-token absolute values bound the signed total, and are what the scores are made of
    assert bool((sums.head_abs_sum >= sums.head_sum.abs() - 1e-9).all())
    assert bool((sums.head_abs_sum > 0).all()) and bool((sums.ffn_abs_sum > 0).all())
    torch.testing.assert_close(sums.head_scores(), sums.head_abs_sum / sums.tokens)


def test_gate_gradient_matches_a_finite_difference():
    """Independent of the hooks' bookkeeping: central difference of the loss in float64 (GPT-2:
    Llama's RMSNorm computes in float32 whatever the model's dtype)."""
    loaded = tiny_model("gpt2")
    loaded.model.double()
    rows = tiny_rows(4)
    head_grad, ffn_grad = gate_gradients(loaded, rows, 2)
    eps = 1e-5

    def loss(head_gate, ffn_gate):
        return task_accuracy(loaded, rows, 2, head_gate.double(), ffn_gate.double()).nll_sum

    for layer, head in [(0, 1), (1, 3)]:
        up, down = torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
        up[layer, head] += eps
        down[layer, head] -= eps
        numeric = (loss(up, torch.ones(2)) - loss(down, torch.ones(2))) / (2 * eps)
        assert numeric == pytest.approx(float(head_grad[layer, head]), rel=1e-5, abs=1e-8)
    up, down = torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    up[1] += eps
    down[1] -= eps
    numeric = (loss(torch.ones(2, 4), up) - loss(torch.ones(2, 4), down)) / (2 * eps)
    assert numeric == pytest.approx(float(ffn_grad[1]), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("pieces", [2, 3])
def test_sharded_sums_add_up_to_the_whole(llama, pieces):
    rows = tiny_rows()
    config = ImportanceConfig(batch_size=4)
    whole = importance_sums(llama, rows, 3, config)
    cut = [round(i * len(rows) / pieces) for i in range(pieces + 1)]
    parts = [importance_sums(llama, rows[a:b], 3, config) for a, b in zip(cut, cut[1:])]
    total = ImportanceSums.reduce(parts)
    assert torch.equal(sum(parts).head_abs_sum, total.head_abs_sum)
    for name in ("head_abs_sum", "ffn_abs_sum", "head_sum", "ffn_sum"):
        assert relative_error(getattr(total, name), getattr(whole, name)) < 1e-5, name
    assert (total.tokens, total.answer_tokens, total.rows, total.correct) == (
        whole.tokens, whole.answer_tokens, whole.rows, whole.correct)
    assert total.nll_sum == pytest.approx(whole.nll_sum, rel=1e-5)
    back = ImportanceSums.from_json(json.loads(json.dumps(total.to_json())))
    assert torch.equal(back.head_abs_sum, total.head_abs_sum) and back.rows == total.rows


def test_gated_units_score_zero_and_nll_matches_accuracy_sums(llama):
    rows = tiny_rows(5)
    head_gate = torch.ones(2, 4)
    head_gate[1, 2] = 0
    sums = importance_sums(llama, rows, 1, head_gate=head_gate)
    assert sums.head_abs_sum[1, 2] == 0 and bool((sums.head_abs_sum[0] > 0).all())
    plain = task_accuracy(llama, rows, 1, head_gate=head_gate)
    assert (sums.correct, sums.rows) == (plain.correct, plain.count)
    assert sums.nll_sum == pytest.approx(plain.nll_sum, rel=1e-5)


def test_ablation_scores_gate_one_unit_at_a_time(llama):
    rows = tiny_rows(4)
    result = ablation_scores(llama, rows, 1, ImportanceConfig(batch_size=2))
    assert result.head_nll_increase.shape == (2, 4) and result.ffn_accuracy_drop.shape == (2,)
    gate = torch.ones(2, 4)
    gate[1, 3] = 0
    alone = task_accuracy(llama, rows, 1, head_gate=gate)
    assert result.head_nll_increase[1, 3] == pytest.approx((alone.nll_sum - result.base_nll_sum) / 4, rel=1e-5)
    assert result.base_nll == pytest.approx(task_accuracy(llama, rows, 1).mean_nll, rel=1e-6)


# -- pruning ----------------------------------------------------------------------------


def test_prune_masks_remove_the_lowest_with_deterministic_ties():
    head_scores = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.1, 0.7, 0.2, 0.8]])
    ffn_scores = torch.tensor([2.0, 1.0, 1.0])
    head_gate, ffn_gate = prune_masks(head_scores, ffn_scores, 0.25, 0.5)
    assert head_gate.tolist() == [[1, 0, 1, 1], [0, 1, 1, 1]]  # two of eight: the two 0.1s
    assert ffn_gate.tolist() == [1, 0, 0]  # 1.5 of 3 rounds (halves up) to 2: the tied 1.0s
    for fraction, expected in [(0.0, 0), (0.1, 1), (0.3, 2), (0.5, 4), (1.0, 8)]:
        assert int((prune_masks(head_scores, ffn_scores, fraction, 0)[0] == 0).sum()) == expected
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prune_masks(head_scores, ffn_scores, 1.5, 0)


def test_iterative_masks_rescore_and_keep_removed_heads(llama):
    rows = tiny_rows(4)
    masks = iterative_head_masks(llama, rows, 1, [0.25, 0.5, 0.75], ImportanceConfig(batch_size=4))
    assert [int((m == 0).sum()) for m in masks] == [2, 4, 6]
    for before, after in zip(masks, masks[1:]):
        assert bool((after <= before).all())  # removed heads stay removed
    with pytest.raises(ValueError, match="increasing"):
        iterative_head_masks(llama, rows, 1, [0.5, 0.25])


def test_pruning_curve_and_plots(llama, tmp_path):
    task = Task("tiny", tuple(tiny_rows(4)))
    sums = importance_sums(llama, task.rows, 1)
    rows = pruning_curve(llama, [task], [0, 1], sums.head_scores(), sums.ffn_scores(),
                         [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0)], ImportanceConfig(max_rows=3))
    assert len(rows) == 6 and {r["rows"] for r in rows} == {3}
    assert {(r["heads"], r["shots"]) for r in rows} == {(p, k) for p in (0.0, 0.5, 1.0) for k in (0, 1)}
    for path in (plot_pruning_curves(rows, tmp_path / "curve.png"),
                 plot_head_heatmap(sums.head_scores(), tmp_path / "heads.png", "heads"),
                 plot_ffn_bars(sums.ffn_scores(), tmp_path / "ffn.png", "ffn")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- tasks ------------------------------------------------------------------------------


@pytest.mark.parametrize("shots", [0, 1, 5])
def test_kshot_prompt_holds_k_examples(shots):
    row = tiny_rows(1)[0]
    prompt = kshot_prompt(row, shots)
    assert prompt.startswith(row.instruction + "\n")
    assert prompt.count("Input: ") == shots + 1 and prompt.count("Output: ") == shots
    assert prompt.endswith(f"Input: {row.query}\nOutput:")
    assert all(f"Input: {e.input}\nOutput: {e.answer}" in prompt for e in row.examples[:shots])


def test_kshot_prompt_refuses_more_shots_than_examples(tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"instruction": "x", "examples": [{"input": "a", "answer": "b"}],
                                "query": "c", "answer": "d"}) + "\n")
    row = load_task(path).rows[0]
    with pytest.raises(ValueError, match=r"short.jsonl row 1: 5 shots asked, the row has only 1"):
        kshot_prompt(row, 5)


GOOD = {"instruction": "Repeat.", "examples": [{"input": "a", "answer": "a"}], "query": "b", "answer": "b"}


@pytest.mark.parametrize("row, message", [
    ({**GOOD, "answer": ""}, "row 3: field 'answer' must be a non-empty string"),
    ({**GOOD, "query": 7}, "row 3: field 'query' must be a non-empty string"),
    ({k: v for k, v in GOOD.items() if k != "instruction"}, "row 3: field 'instruction' is missing"),
    ({**GOOD, "examples": [{"input": "a", "answer": " "}]}, r"row 3: field 'examples\[0\].answer' must be"),
    ({**GOOD, "examples": [{"input": "a"}]}, r"row 3: field 'examples\[0\]' must be an object"),
    ({**GOOD, "examples": "a"}, "row 3: field 'examples' must be a list"),
    ({**GOOD, "extra": 1}, r"row 3: unknown field\(s\) \['extra'\]"),
    ("not json", "row 3: not valid JSON"),
])
def test_load_task_errors_name_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "capitals.jsonl"
    bad = row if isinstance(row, str) else json.dumps(row)
    path.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n")  # line 2 blank: the bad row is line 3
    with pytest.raises(TaskError, match=f"capitals.jsonl {message}"):
        load_task(path)


def test_load_tasks_of_a_directory(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    tasks = load_tasks(tmp_path)
    assert [(t.name, len(t.rows)) for t in tasks] == [("a", 2), ("b", 1)]
    assert select_rows(tasks[0], ImportanceConfig(max_rows=1)) == [tasks[0].rows[0]]
    with pytest.raises(TaskError, match="no rows"):
        (tmp_path / "c.jsonl").write_text("\n")
        load_tasks(tmp_path)
    with pytest.raises(TaskError, match="no \\*.jsonl"):
        load_tasks(tmp_path / "missing")


def test_shipped_tasks_are_valid_five_shot_tasks():
    tasks = load_tasks()
    assert len(tasks) >= 3
    for task in tasks:
        assert len(task.rows) >= 50 and task.max_shots >= 5, task.name
        for row in task.rows:
            assert row.query not in [e.input for e in row.examples], (task.name, row.query)
