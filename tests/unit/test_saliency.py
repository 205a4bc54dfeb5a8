"""SaLEM layer saliency: the edit dataset, per-sample gradient sums, exact shard reduce, the
object-store model snapshot, and `editflow saliency` (tiny models)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from editing_core.data import EditRequest
from editing_core.evaluate import greedy_continuations, teacher_forced_predictions
from editing_core.models.tiny import tiny_model
from editing_core.saliency import (
    GROUPS, SaliencyConfig, SaliencySums, Sample, build_samples, count_groups, saliency_sums, salient_layer,
)
from editing_core.tokens import completion_batch, completion_ids, completion_nll
from pipelines.cli import main
from tasks.saliency import ModelSnapshot, SnapshotWorker, saliency_shard, sharded_saliency, snapshot_model
from tasks.sharding import split_round_robin
from tests.conftest import same_state, snapshot


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def assert_same_scores(a: SaliencySums, b: SaliencySums) -> None:
    assert torch.equal(a.counts, b.counts) and a.roles == b.roles
    for x, y in ((a.abs_sum, b.abs_sum), (a.fro_sum, b.fro_sum), (a.nll_sum, b.nll_sum)):
        assert relative_error(x, y) < 1e-5
    sa, sb = a.scores(), b.scores()
    assert relative_error(sa.layer_scores, sb.layer_scores) < 1e-5 and sa.chosen_layer == sb.chosen_layer
    for group in sb.by_group:
        assert relative_error(sa.by_group[group].role_scores, sb.by_group[group].role_scores) < 1e-5


# -- the edit dataset ---------------------------------------------------------------------


def test_samples_have_fail_adapt_and_pass_groups(llama, facts: list[EditRequest]) -> None:
    samples = build_samples(llama, facts)
    assert count_groups(samples) == {"fail": 3, "adapt": 2, "pass": 3}
    assert [s.group for s in samples] == ["fail"] * 3 + ["adapt"] * 2 + ["pass"] * 3
    assert [(s.prompt, s.target) for s in samples[:5]] == [
        ("The capital of France is", "Rome"), ("Bob works for", "Sega Nokia"), ("The language of Japan is", "German"),
        ("France capital city is", "Rome"), ("Bob is born in", "Sega Nokia")]
    passes = samples[5:]
    assert [s.prompt for s in passes] == [r.locality_prompt for r in facts]
    tok = llama.tokenizer
    lengths = [len(completion_ids(tok, r.locality_prompt, r.locality_answer)[1]) for r in facts]
    greedy = greedy_continuations(llama.model, tok, [s.prompt for s in passes], lengths, 8)
    for sample, ids in zip(passes, greedy):
        assert completion_ids(tok, sample.prompt, sample.target)[1] == ids  # the model's own greedy answer
    # teacher-forced, the argmax along the target is the target: the loss is the model's own argmax path
    for predicted, gold in teacher_forced_predictions(llama.model, tok, [(s.prompt, s.target) for s in passes], 8):
        assert torch.equal(predicted, gold)


def test_heldout_pass_samples_keep_only_what_the_model_gets_right(llama, facts: list[EditRequest]) -> None:
    tok = llama.tokenizer
    own = tok.decode(greedy_continuations(llama.model, tok, ["Alice plays"], [1], 1)[0])
    wrong = "Oslo" if own != "Oslo" else "Cairo"
    samples = build_samples(llama, facts, heldout=[("Alice plays", own), ("Alice plays", wrong)])
    assert [(s.prompt, s.target) for s in samples if s.group == "pass"] == [("Alice plays", own)]
    assert count_groups(samples) == {"fail": 3, "adapt": 2, "pass": 1}


def test_sample_and_config_are_checked(llama) -> None:
    with pytest.raises(ValueError, match="sample group"):
        Sample("other", "a", "b")
    with pytest.raises(ValueError, match="roles must be"):
        SaliencyConfig(roles=("mlp_in", "q_proj"))
    with pytest.raises(ValueError, match="roles must be"):
        SaliencyConfig(roles=())
    assert SaliencyConfig(roles=["mlp_out"]).roles == ("mlp_out",)  # lists from JSON become tuples
    with pytest.raises(ValueError, match="causal"):
        build_samples(tiny_model("bert"), [EditRequest("a", "b")])


# -- per-sample gradients -----------------------------------------------------------------


def test_mean_abs_score_equals_a_direct_autograd_gradient(llama) -> None:
    sample = Sample("fail", "The capital of France is", "Rome Paris")
    before = snapshot(llama.model)
    sums = saliency_sums(llama, [sample], SaliencyConfig(roles=("attn_out", "mlp_out")))
    weight = llama.model.model.layers[1].mlp.down_proj.weight
    batch = completion_batch(llama.tokenizer, [(sample.prompt, sample.target)])
    weight.requires_grad_(True)
    try:
        logits = llama.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        (grad,) = torch.autograd.grad(completion_nll(logits, batch)[0], [weight])
    finally:
        weight.requires_grad_(False)
    g = grad.double()
    fail, layer, role = GROUPS.index("fail"), 1, 1  # mlp_out is the second role
    assert sums.counts.tolist() == [1, 0, 0]
    assert abs(float(sums.abs_sum[fail, layer, role]) - float(g.abs().mean())) <= 1e-6 * float(g.abs().mean())
    assert abs(float(sums.fro_sum[fail, layer, role]) - float(g.norm()) / g.numel()) <= 1e-6 * float(g.norm()) / g.numel()
    scores = sums.scores()
    assert float(scores.role_scores[layer, role]) == pytest.approx(float(g.abs().mean()), rel=1e-6)
    assert float(scores.layer_scores[layer]) == pytest.approx(float(scores.role_scores[layer].mean()), rel=1e-12)
    assert same_state(llama.model, before)  # nothing changed ...
    assert not any(p.requires_grad for p in llama.model.parameters())  # ... and requires_grad is restored


@pytest.mark.parametrize("parts", [2, 3])
def test_shard_sums_add_up_to_the_whole(llama, facts: list[EditRequest], parts: int) -> None:
    samples = build_samples(llama, facts)
    options = {"roles": ("mlp_in", "mlp_out", "attn_out")}
    whole = saliency_shard(llama, samples, options)
    shards = split_round_robin(samples, parts)
    assert len(shards) == parts
    total = SaliencySums.reduce([saliency_shard(llama, shard, options) for shard in shards])
    assert_same_scores(total, whole)
    assert total.counts.tolist() == [3, 2, 3]
    assert_same_scores(sharded_saliency("unused", samples, SaliencyConfig(), workers=0, loaded=llama), whole)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_saliency_on_each_architecture(arch: str, facts: list[EditRequest]) -> None:
    loaded = tiny_model(arch)
    before = snapshot(loaded.model)
    samples = build_samples(loaded, facts)
    sums = saliency_sums(loaded, samples)
    scores = sums.scores()
    assert scores.role_scores.shape == (2, 3) and scores.layer_scores.shape == (2,)
    assert bool((scores.role_scores > 0).all()) and bool(torch.isfinite(scores.role_fro).all())
    assert set(scores.by_group) == set(GROUPS) and scores.samples == len(samples)
    assert scores.chosen_layer == int(scores.layer_scores.argmax()) == salient_layer(sums)
    other = 1 - scores.chosen_layer
    assert scores.chosen_among([other]) == other and scores.chosen_among([0, 1]) == scores.chosen_layer
    # pass samples are the model's own answers: their loss is lower than that of the new facts
    assert scores.by_group["pass"].mean_nll < scores.by_group["fail"].mean_nll
    assert same_state(loaded.model, before)


def test_object_store_snapshot_rebuilds_the_same_model(facts: list[EditRequest]) -> None:
    loaded = tiny_model("gpt2")
    samples = build_samples(loaded, facts)
    snap: ModelSnapshot = pickle.loads(pickle.dumps(snapshot_model(loaded), protocol=5))  # as Ray ships it
    for array in snap.arrays.values():
        array.flags.writeable = False  # object-store arrays are read-only
    worker = SnapshotWorker(snap)
    assert same_state(worker.loaded.model, snapshot(loaded.model))
    options = {"roles": ("mlp_in", "mlp_out", "attn_out")}
    assert_same_scores(worker.score(saliency_shard, samples, options), saliency_shard(loaded, samples, options))


# -- sums, scores, choice -----------------------------------------------------------------


def hand_sums(layer_abs: list[list[float]], counts: list[int]) -> SaliencySums:
    """Sums whose per-group (mean |grad| summed) per layer are `layer_abs[group][layer]` (one role)."""
    sums = SaliencySums.zeros(len(layer_abs[0]), ("mlp_out",))
    sums.abs_sum[:, :, 0] = torch.tensor(layer_abs, dtype=torch.float64)
    sums.counts[:] = torch.tensor(counts)
    return sums


def test_salient_layer_is_the_argmax_of_the_layer_scores() -> None:
    # fail pulls on layer 2, pass on layer 0; pooled over all samples: (1+2+9, 2+2+0, 5+1+0) / 4
    sums = hand_sums([[1.0, 2.0, 5.0], [2.0, 2.0, 1.0], [9.0, 0.0, 0.0]], [2, 1, 1])
    assert salient_layer(sums) == 0
    assert salient_layer(sums, groups=("fail", "adapt")) == 2
    assert salient_layer(sums, groups=("pass",)) == 0
    scores = sums.scores()
    assert scores.layer_scores.tolist() == pytest.approx([3.0, 1.0, 1.5])
    assert scores.by_group["fail"].layer_scores.tolist() == pytest.approx([0.5, 1.0, 2.5])
    assert salient_layer(hand_sums([[1.0, 3.0, 3.0], [0, 0, 0], [0, 0, 0]], [1, 0, 0])) == 1  # ties: the lower layer
    assert set(hand_sums([[1.0, 3.0, 3.0], [0, 0, 0], [0, 0, 0]], [1, 0, 0]).scores().by_group) == {"fail"}
    with pytest.raises(ValueError, match="no samples"):
        salient_layer(sums.__class__.zeros(3, ("mlp_out",)))


def test_sums_json_round_trip_and_mismatched_adds(llama, facts: list[EditRequest]) -> None:
    sums = saliency_sums(llama, build_samples(llama, facts)[:4], SaliencyConfig(roles=("mlp_in", "attn_out")))
    again = SaliencySums.from_json(json.loads(json.dumps(sums.to_json())))
    assert again.roles == sums.roles and torch.equal(again.abs_sum, sums.abs_sum) and torch.equal(again.counts, sums.counts)
    assert sum([sums, again]).counts.tolist() == [6, 2, 0]
    with pytest.raises(ValueError, match="cannot add saliency sums"):
        sums + SaliencySums.zeros(2, ("mlp_out",))


# -- the command --------------------------------------------------------------------------

FACTS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "rephrase": ["France capital city is"],
     "locality_prompt": "Alice plays", "locality_answer": "chess"},
    {"prompt": "Bob works for", "target_new": "Sega", "locality_prompt": "Carol plays the", "locality_answer": "piano"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_saliency_command_writes_json_and_png(tiny_llama_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": "Alice plays", "target_new": "Oslo"}])
    out = tmp_path / "out"
    code = main(["saliency", "--model", tiny_llama_dir, "--facts", str(facts), "--workers", "0", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads((out / "saliency.json").read_text())
    assert document["workers"] == 0 and document["layers"] == 2 and document["roles"] == ["mlp_in", "mlp_out", "attn_out"]
    assert document["counts"] == {"fail": 2, "adapt": 1, "pass": 2} and document["pass_source"] == "locality"
    assert document["chosen_layer"] == max(range(2), key=lambda i: document["layer_scores"][i])
    assert set(document["role_scores"]) == {"mlp_in", "mlp_out", "attn_out"} and len(document["role_scores"]["mlp_in"]) == 2
    assert set(document["by_group"]) == {"fail", "adapt", "pass"}
    assert document["by_group"]["adapt"]["samples"] == 1 and set(document["seconds"]) == {"samples", "gradients"}
    assert SaliencySums.from_json(document["sums"]).scores().chosen_layer == document["chosen_layer"]
    assert (out / "saliency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"most salient layer: {document['chosen_layer']}" in captured.out

    code = main(["saliency", "--model", tiny_llama_dir, "--facts", str(facts), "--roles", "mlp_out", "--heldout", str(heldout),
                 "--out", str(out)])
    assert code == 2 and "--force" in capsys.readouterr().err
    code = main(["saliency", "--model", tiny_llama_dir, "--facts", str(facts), "--roles", "mlp_out", "--heldout", str(heldout),
                 "--out", str(out), "--force"])
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "saliency.json").read_text())
    assert document["roles"] == ["mlp_out"] and document["pass_source"] == "heldout"
    assert document["counts"]["pass"] <= 1  # "Oslo" is kept only if the random model predicts it


def test_saliency_command_rejects_bad_input_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [FACTS[0], {"prompt": "Bob works for"}])
    out = tmp_path / "out"
    code = main(["saliency", "--model", str(tmp_path / "no-such-model"), "--facts", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad} line 2, field 'target_new': missing field" in err
    assert "no-such-model" not in err and "Traceback" not in err and not out.exists()
    good = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    code = main(["saliency", "--model", str(tmp_path / "no-such-model"), "--facts", str(good), "--roles", "mlp_in,q_proj",
                 "--out", str(out)])
    assert code == 2 and "--roles" in capsys.readouterr().err and not out.exists()
