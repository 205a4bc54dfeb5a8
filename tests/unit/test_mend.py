"""MEND and SaLEM editors on tiny models: the identity editor is the plain gradient step, batched
edits add up, training lowers the loss, the SVD factors have the requested rank, and a saved
editor reloads and edits without changing the model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from editing_core.artifacts import load_artifact, weights_hash
from editing_core.editors import make_editor
from editing_core.editors.mend import (
    EditorFileError, MendNetConfig, MendTrainConfig, build_net, calibrate_edit_rates, edit_pairs, load_net,
    edited_forward, editor_inputs, is_better, key_second_moments, key_texts, low_rank_pairs, lr_factor, mend_loss, parameter_groups, save_net,
    set_key_preconditioners, token_pairs, training_batch,
)
from editing_core.data import EditRequest
from editing_core.editors.salem import edit_gain_scan, salem_net_config
from editing_core.models.tiny import tiny_model
from editing_core.tokens import completion_batch, completion_logits, completion_nll, subject_last_token
from tests.conftest import same_state, snapshot

STEPS = 40
ARCHS = ("llama", "gpt2", "opt")


def _dense(factors):
    return {name: (f.left @ f.right).detach() for name, f in factors.items()}


def _gradients(loaded, requests, names):
    """dL/dW (out, in) of the summed per-request target NLL, by plain autograd."""
    params = [loaded.model.get_parameter(n) for n in names]
    batch = completion_batch(loaded.tokenizer, [(r.prompt, r.target_new) for r in requests])
    for p in params:
        p.requires_grad_(True)
    try:
        loss = completion_nll(completion_logits(loaded.model, batch), batch).sum()
        grads = torch.autograd.grad(loss, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    return {n: loaded.adapter.as_out_in(g) for n, g in zip(names, grads)}


def _perturbed(net, seed=1):
    """The net with random non-zero U, scales and offsets: no longer the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for editor in net.editors.values():
            for block in editor.blocks:
                block.up.copy_(torch.randn(block.up.shape, generator=generator) * 0.1)
                block.offset.copy_(torch.randn(block.offset.shape, generator=generator) * 0.01)
    return net.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_editor_reproduces_the_plain_gradient_edit(arch, facts):
    loaded = tiny_model(arch)
    config = MendNetConfig(layers=(0, 1), roles=("mlp_in", "mlp_out", "attn_out"), edit_lr_init=0.01)
    net = build_net(loaded, config).eval()
    state = snapshot(loaded.model)
    pairs = edit_pairs(loaded, facts, config, net.param_names, batch_size=2)
    deltas = _dense(net(pairs))
    grads = _gradients(loaded, facts, net.param_names)
    assert same_state(loaded.model, state)
    for name in net.param_names:
        assert torch.allclose(deltas[name], -0.01 * grads[name], rtol=1e-4, atol=1e-7), name
        assert grads[name].abs().max() > 0


def test_batched_edit_equals_the_sum_of_single_edits(llama, facts):
    config = MendNetConfig(layers=(-1,), rank=8)
    net = _perturbed(build_net(llama, config))
    batched = _dense(net(edit_pairs(llama, facts, config, net.param_names, batch_size=16)))
    singles = [_dense(net(edit_pairs(llama, [r], config, net.param_names, batch_size=16))) for r in facts]
    for name in net.param_names:
        total = sum(s[name] for s in singles)
        assert torch.allclose(batched[name], total, rtol=1e-4, atol=1e-6), name
        assert not torch.allclose(batched[name], singles[0][name])


def test_subject_position_editor_edits_along_the_subjects_last_token_only(tmp_path, llama, facts):
    subjects = [replace(facts[0], subject="capital of France"), replace(facts[1], subject="Bob")]
    assert [subject_last_token(llama.tokenizer, r.prompt, r.subject) for r in subjects] == [
        llama.tokenizer(r.prompt)["input_ids"].index(llama.tokenizer.convert_tokens_to_ids(word))
        for r, word in zip(subjects, ("France", "Bob"))]
    ids = llama.tokenizer("Bob plays and Bob works for")["input_ids"]
    bobs = [i for i, t in enumerate(ids) if t == llama.tokenizer.convert_tokens_to_ids("Bob")]
    assert [subject_last_token(llama.tokenizer, "Bob plays and Bob works for", "Bob", after) for after in (0, 1)] == bobs
    assert subject_last_token(llama.tokenizer, "Bob plays", "Carol") is None
    # layer 0: the subject's position reaches the answer through layer 1's attention
    config = MendNetConfig(layers=(0,), roles=("mlp_in", "mlp_out"), edit_lr_init=0.01, pair_positions="subject")
    net = build_net(llama, config).eval()
    deltas = _dense(net(edit_pairs(llama, subjects, config, net.param_names, batch_size=2)))
    expected = {name: 0 for name in net.param_names}
    for r in subjects:  # the identity editor's step: -lr delta_s u_s^T, s the subject's last token
        batch = completion_batch(llama.tokenizer, [(r.prompt, r.target_new)])
        every = token_pairs(llama, batch, net.param_names)  # all tokens, in order
        at = subject_last_token(llama.tokenizer, r.prompt, r.subject)
        for name, (u, delta) in every.items():
            expected[name] = expected[name] - 0.01 * torch.outer(delta[at], u[at])
    for name in net.param_names:
        assert expected[name].abs().max() > 0
        assert torch.allclose(deltas[name], expected[name], rtol=1e-4, atol=1e-7), name

    save_net(net, tmp_path / "editor", {"base_model": llama.name})
    state = snapshot(llama.model)
    editor = make_editor("mend", editor=str(tmp_path / "editor"))
    assert editor.edit(llama, subjects).deltas[net.param_names[0]].rank == 2  # one pair per request
    for bad in (replace(facts[2], subject=None, source="facts.jsonl line 3"), replace(facts[2], subject="Italy")):
        with pytest.raises(ValueError, match="subject"):
            editor.edit(llama, [subjects[0], bad])
    with pytest.raises(ValueError, match="facts.jsonl line 3"):
        editor.edit(llama, [replace(facts[2], subject=None, source="facts.jsonl line 3")])
    assert same_state(llama.model, state)
    with pytest.raises(ValueError, match="pair_positions"):
        MendNetConfig(pair_positions="answer")


def test_training_batches_name_a_request_without_locality_prompt(llama, facts):
    with pytest.raises(ValueError, match="facts.jsonl line 2"):
        training_batch(llama, [facts[0], replace(facts[1], locality_prompt=None, source="facts.jsonl line 2")])


def test_svd_factors_have_the_requested_rank_and_are_the_best_approximation():
    generator = torch.Generator().manual_seed(0)
    u, delta = torch.randn(30, 12, generator=generator), torch.randn(30, 20, generator=generator)
    full = delta.T @ u  # (out, in), rank 12
    for k in (1, 3, 5):
        u_k, delta_k = low_rank_pairs(u, delta, k)
        assert u_k.shape == (k, 12) and delta_k.shape == (k, 20)
        approx = delta_k.T @ u_k
        assert torch.linalg.matrix_rank(approx) == k
        a, s, vh = torch.linalg.svd(full)
        best = (a[:, :k] * s[:k]) @ vh[:k]
        assert torch.allclose(approx, best, atol=1e-4)
    u_all, _ = low_rank_pairs(u, delta, 50)  # asking for more than exists keeps the true rank
    assert u_all.shape[0] == 12


def test_salem_factors_sum_groups_of_requests_before_the_svd(llama, facts):
    config = salem_net_config(0, svd_rank=2, svd_group=2, edit_lr_init=1.0)  # layer 0: every token counts
    net = build_net(llama, config).eval()
    pairs = edit_pairs(llama, facts, config, net.param_names, batch_size=16)
    u, _ = pairs[net.param_names[0]]
    assert u.shape[0] == 2 + 2  # groups [0, 1] and [2]: two directions each
    deltas = _dense(net(pairs))
    grads = [_gradients(llama, facts[:2], net.param_names), _gradients(llama, facts[2:], net.param_names)]
    for name in net.param_names:
        best = 0
        for group in grads:
            a, s, vh = torch.linalg.svd(group[name])
            best = best + (a[:, :2] * s[:2]) @ vh[:2]
        assert torch.allclose(deltas[name], -best, rtol=1e-3, atol=1e-6)


def test_a_few_training_steps_lower_the_training_loss(llama, facts):
    # a random tiny model predicts near-uniformly: it takes large steps to move it
    config = MendNetConfig(layers=(0, 1), rank=8, edit_lr_init=1.0)
    train = MendTrainConfig(lr=1e-2, edit_lr_lr=1e-3, c_edit=1.0)
    net = build_net(llama, config).train()
    state = snapshot(llama.model)
    batch = training_batch(llama, facts)
    optimizer = torch.optim.Adam(parameter_groups(net, train))
    losses = []
    for _ in range(STEPS):
        loss, parts = mend_loss(net, llama, batch, train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["loss"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, losses
    assert same_state(llama.model, state) and all(p.grad is None for p in llama.model.parameters())
    assert net.editors[next(iter(net.editors))].norm.count > 0


def test_locality_kl_is_taken_where_the_locality_answer_is_predicted(llama, facts):
    rows = [*facts, EditRequest("Dave works for", "Sony", locality_prompt="Erin plays the")]  # no locality answer
    answer = training_batch(llama, rows, "answer")
    every = training_batch(llama, rows, "all")
    for row, request in enumerate(rows[:3]):  # answered: exactly the positions predicting the answer's tokens
        expected = completion_batch(llama.tokenizer, [(request.locality_prompt, request.locality_answer)])
        n = expected.input_ids.shape[1]
        assert torch.equal(answer.locality.input_ids[row, :n], expected.input_ids[0])
        assert torch.equal(answer.locality_mask[row, :n], expected.target_mask[0])
        assert answer.locality_mask[row, n:].sum() == 0
    assert torch.equal(answer.locality_mask[3], answer.locality.attention_mask[3].bool())  # unanswered: all positions
    assert torch.equal(every.locality_mask, every.locality.attention_mask.bool())
    assert 0 < answer.locality_mask.sum() < every.locality_mask.sum()
    with pytest.raises(ValueError, match="locality_positions"):
        MendTrainConfig(locality_positions="prompt")


def test_the_locality_kl_follows_the_mask(llama, facts):
    # a perturbed editor moves the model; the loss's KL is the mean over exactly the masked positions
    net = _perturbed(build_net(llama, MendNetConfig(layers=(0, 1), rank=8, edit_lr_init=1.0)))
    for positions in ("answer", "all"):
        batch = training_batch(llama, facts, positions)
        _, parts = mend_loss(net, llama, batch, MendTrainConfig(locality_positions=positions))
        factors = net(editor_inputs(llama, batch.edit, batch.requests, net.param_names, net.config))
        with torch.no_grad(), edited_forward(llama, factors):
            logprobs = completion_logits(llama.model, batch.locality).float().log_softmax(-1)
        kl = (batch.locality_reference.exp() * (batch.locality_reference - logprobs)).sum(-1)  # (B, T)
        assert parts["locality_kl"] > 0
        assert parts["locality_kl"] == pytest.approx(kl[batch.locality_mask].mean().item(), rel=1e-4)
        unchanged = logprobs.argmax(-1) == batch.locality_reference.argmax(-1)  # (B, T)
        assert parts["locality_agreement"] == pytest.approx(unchanged[batch.locality_mask].float().mean().item())
    with torch.no_grad():
        net.edit_lrs.zero_()  # no edit: every locality prediction stays
    assert mend_loss(net, llama, batch, MendTrainConfig())[1]["locality_agreement"] == 1.0


def test_cosine_lr_schedule_decays_from_lr_to_its_floor():
    train = MendTrainConfig(steps=101, lr_schedule="cosine", lr_min_ratio=0.1)
    factors = [lr_factor(train, step) for step in range(1, 102)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.1) and factors[50] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert {lr_factor(MendTrainConfig(steps=101), step) for step in (1, 50, 101)} == {1.0}
    for bad in ({"lr_schedule": "step"}, {"lr_min_ratio": 1.5}, {"select_by": "val_loss"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MendTrainConfig(**bad)


def test_editor_selection_resumes_from_the_value_that_chose_the_best_editor(tmp_path):
    import json

    from editing_core.editors.mend import NET_CONFIG_NAME
    from tasks.mend_train import _selected_value

    assert _selected_value(tmp_path, "loss") is None  # no best editor yet
    document = {"trained_steps": 3, "selected_by": "val_loss", "metrics": {"loss": 0.1, "val_loss": 0.3, "val_edit_accuracy": 0.3}}
    (tmp_path / NET_CONFIG_NAME).write_text(json.dumps(document))
    assert _selected_value(tmp_path, "loss") == 0.3  # the validation value, not the training loss
    assert _selected_value(tmp_path, "edit_accuracy") is None  # chosen by another metric: selection starts afresh
    assert is_better("loss", 0.2, 0.3) and not is_better("loss", 0.3, 0.3) and is_better("locality_agreement", 0.9, 0.8)
    assert is_better("edit_nll", 5.0, None)


def test_calibration_starts_each_layer_at_its_best_plain_gradient_rate(llama, facts):
    config = MendNetConfig(layers=(0, 1), rank=8)
    train = MendTrainConfig(edit_lr_grid=(1e-3, 1.0, 30.0), c_edit=1.0)
    net = build_net(llama, config).train()
    batches = [training_batch(llama, facts[:2]), training_batch(llama, facts[2:])]
    records = calibrate_edit_rates(net, llama, batches, train)
    assert net.training and all(e.norm.count == 0 for e in net.editors.values())  # the search taught the norm nothing
    assert [r["slot"] for r in records] == [0, 0, 0, 1, 1, 1]
    chosen = net.edit_lrs.detach().tolist()
    assert chosen[0] == chosen[1] and chosen[2] == chosen[3]  # one rate per layer
    for slot, rate in enumerate(chosen[::2]):
        best = min((r for r in records if r["slot"] == slot), key=lambda r: r["loss"])
        assert rate == pytest.approx(best["edit_lr"])
    # the second layer was searched with the first at its chosen rate: the recorded loss is reproduced
    with torch.no_grad():
        loss = sum(mend_loss(net.eval(), llama, b, train)[1]["loss"] for b in batches) / 2
    assert loss == pytest.approx(min(r["loss"] for r in records if r["slot"] == 1), rel=1e-5)
    assert loss < min(r["loss"] for r in records if r["edit_lr"] == 1e-3 and r["slot"] == 0)


def test_edit_gain_scan_calibrates_one_svd_editor_per_layer(llama, facts):
    train = MendTrainConfig(batch_size=2, edit_lr_grid=(1e-2, 1.0, 30.0), c_edit=1.0)
    scan = edit_gain_scan(llama, facts, [1, 0], train, MendNetConfig(svd_rank=2), progress=False)
    assert [r["layer"] for r in scan] == [1, 0]
    for record in scan:
        assert len(record["grid"]) == 3 and record["loss"] == min(g["loss"] for g in record["grid"])
    # the layer's best plain step, reproduced by hand: an identity SVD editor at the chosen rate
    best = scan[1]
    net = build_net(llama, salem_net_config(0, svd_rank=2, svd_group=2, edit_lr_init=best["edit_lr"])).eval()
    batches = [training_batch(llama, facts[i : i + 2]) for i in range(0, len(facts), 2)]
    with torch.no_grad():
        loss = sum(mend_loss(net, llama, b, train)[1]["loss"] for b in batches) / len(batches)
    assert loss == pytest.approx(best["loss"], rel=1e-5)


def test_salem_layer_by_edit_gain_is_the_candidate_with_the_lowest_loss(tmp_path, llama, facts):
    import json

    from pipelines.editor_training import EditorTrainingSpec, _salient_layer

    train = MendTrainConfig(batch_size=2, edit_lr_grid=(1e-2, 1.0))
    spec = EditorTrainingSpec(model="tiny-llama", facts=tmp_path / "facts.json", train=train, salient=True,
                              salient_by="edit_gain", salient_layers=(-1, 0))
    layer = _salient_layer(spec, llama, facts, tmp_path)
    document = json.loads((tmp_path / "edit_gain" / "edit_gain.json").read_text())
    assert [r["layer"] for r in document["layers"]] == [1, 0]  # -1 is the last of the two layers
    assert layer == document["chosen_layer"] == min(document["layers"], key=lambda r: r["loss"])["layer"]
    assert (tmp_path / "edit_gain" / "edit_gain.png").stat().st_size > 0
    with pytest.raises(ValueError, match="edit_lr_grid"):
        EditorTrainingSpec(model="m", facts=tmp_path, salient_by="edit_gain", train=MendTrainConfig(edit_lr_grid=()))
    with pytest.raises(ValueError, match="salient_by"):
        EditorTrainingSpec(model="m", facts=tmp_path, salient_by="magnitude")


def test_editor_training_checks_every_row_before_it_starts(tmp_path, facts):
    import json

    from pipelines.editor_training import EditorTrainingSpec, train_editor_run

    subjects = [replace(facts[0], subject="France"), replace(facts[1], subject="Bob"), replace(facts[2], subject="Italy")]
    (tmp_path / "facts.json").write_text(json.dumps([r.to_dict() for r in subjects]))
    (tmp_path / "val.json").write_text(json.dumps([r.to_dict() for r in (subjects[0], replace(subjects[1], locality_prompt=None))]))
    subject_net = MendNetConfig(layers=(0,), pair_positions="subject")
    runs = [(EditorTrainingSpec(model="no-such-model", facts=tmp_path / "facts.json", net=subject_net), r"facts.json: rows \[2\]: field 'subject'"),
            (EditorTrainingSpec(model="no-such-model", facts=tmp_path / "val.json"), r"val.json: rows \[1\] have no locality prompt"),
            (EditorTrainingSpec(model="no-such-model", facts=tmp_path / "facts.json", val=tmp_path / "val.json"),
             r"val.json: rows \[1\] have no locality prompt")]
    for spec, message in runs:  # refused before the model is loaded or anything is written
        with pytest.raises(ValueError, match=message):
            train_editor_run(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_saved_editor_reloads_and_edits_with_low_rank_factors(tmp_path, gpt2, facts):
    config = MendNetConfig(layers=(-1,), roles=("mlp_out",), rank=4)
    net = _perturbed(build_net(gpt2, config))
    save_net(net, tmp_path / "editor", {"base_model": gpt2.name, "base_hash": weights_hash(gpt2.model, net.param_names)})
    reloaded, document = load_net(tmp_path / "editor")
    assert document["base_model"] == gpt2.name
    for key, value in net.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)

    state = snapshot(gpt2.model)
    editor = make_editor("mend", editor=str(tmp_path / "editor"), check_base=True)
    artifact = editor.edit(gpt2, facts[:2])
    assert same_state(gpt2.model, state)
    (name, delta), = artifact.deltas.items()
    tokens = sum(len(gpt2.tokenizer(r.prompt)["input_ids"]) + len(gpt2.tokenizer(" " + r.target_new)["input_ids"]) for r in facts[:2])
    assert delta.dense is None and delta.rank == tokens  # one rank-1 term per token
    assert delta.tensor().shape == gpt2.model.get_parameter(name).shape
    artifact.save(tmp_path / "artifact")
    again = load_artifact(tmp_path / "artifact")
    batch = completion_batch(gpt2.tokenizer, [(facts[0].prompt, facts[0].target_new)])
    before = completion_logits(gpt2.model, batch)
    with again.attached(gpt2.model):
        after = completion_logits(gpt2.model, batch)
    assert not torch.allclose(before, after)
    assert same_state(gpt2.model, state)


def test_edit_scale_multiplies_the_update_and_is_recorded(tmp_path, llama, facts):
    net = _perturbed(build_net(llama, MendNetConfig(layers=(-1,), rank=4)))
    save_net(net, tmp_path / "editor", {"base_model": llama.name})
    as_trained = make_editor("mend", editor=str(tmp_path / "editor")).edit(llama, facts[:2])
    scaled = make_editor("mend", editor=str(tmp_path / "editor"), edit_scale=0.25).edit(llama, facts[:2])
    assert scaled.meta.config["edit_scale"] == 0.25 and as_trained.meta.config["edit_scale"] == 1.0
    for name, delta in as_trained.deltas.items():
        assert delta.tensor().abs().max() > 0
        assert torch.allclose(scaled.deltas[name].tensor(), 0.25 * delta.tensor(), rtol=1e-5, atol=1e-8), name
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="edit_scale must be > 0"):
            make_editor("mend", editor=str(tmp_path / "editor"), edit_scale=bad)


def test_editor_checks_its_kind_and_the_model(tmp_path, llama, gpt2, facts):
    net = build_net(llama, MendNetConfig(layers=(-1,)))
    save_net(net, tmp_path / "mend", {"base_model": llama.name, "base_hash": weights_hash(llama.model, net.param_names)})
    with pytest.raises(EditorFileError, match="factors='tokens'"):
        make_editor("salem", editor=str(tmp_path / "mend")).edit(llama, facts)
    with pytest.raises(EditorFileError, match="trained for weights"):
        make_editor("mend", editor=str(tmp_path / "mend")).edit(gpt2, facts)
    other = tiny_model("llama", seed=3)
    with pytest.raises(EditorFileError, match="differ"):
        make_editor("mend", editor=str(tmp_path / "mend"), check_base=True).edit(other, facts)
    with pytest.raises(EditorFileError, match="not a trained MEND editor"):
        make_editor("mend", editor=str(tmp_path)).edit(llama, facts)
    with pytest.raises(ValueError, match="needs a trained editor"):
        make_editor("mend").edit(llama, facts)


def test_sequential_mend_edits_fold_into_one_artifact(tmp_path, llama, facts):
    net = _perturbed(build_net(llama, MendNetConfig(layers=(-1,), rank=4)))
    save_net(net, tmp_path / "editor", {"base_model": llama.name})
    editor = make_editor("mend", editor=str(tmp_path / "editor"))
    state = snapshot(llama.model)
    with editor.sequential(llama) as session:
        for request in facts:
            session.add(request)
        artifact = session.artifact()
    assert same_state(llama.model, state)
    assert set(artifact.deltas) == set(net.param_names)


def test_training_curves_of_several_runs_share_one_figure(tmp_path):
    from matplotlib.image import imread

    from tasks.mend_train import plot_histories, plot_history

    def history(accuracy):
        return [{"step": s, "loss": 1.0 / s, "edit_nll": 2.0 / s, "edit_accuracy": accuracy * s / 100,
                 **({"val_loss": 1.5 / s, "val_edit_nll": 2.5 / s, "val_edit_accuracy": accuracy} if s % 50 == 0 else {})}
                for s in range(10, 101, 10)]

    one = plot_history(history(0.5), tmp_path / "one.png")
    two = plot_histories({"a": history(0.5), "b": history(0.8)}, tmp_path / "two.png", "two runs")
    assert imread(one).shape == imread(two).shape  # same panels
    assert (imread(one) != imread(two)).any()  # the second run is drawn
    with pytest.raises(KeyError):
        plot_history([{"step": 1, "loss": 1.0}], tmp_path / "bad.png")  # a history without the plotted keys


def _input_second_moment(loaded, name, texts):
    """E[u u^T] of the weight's inputs over the tokens of `texts`, one unpadded text at a time."""
    module = loaded.model.get_submodule(name.rsplit(".", 1)[0])
    inputs = []
    handle = module.register_forward_hook(lambda _m, args, _out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for text in texts:
                loaded.model(input_ids=torch.tensor([loaded.tokenizer(text)["input_ids"]]))
    finally:
        handle.remove()
    u = torch.cat(inputs).double()
    return u.T @ u / u.shape[0]


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_whitened_identity_editor_is_the_preconditioned_gradient_step(tmp_path, arch, facts):
    loaded = tiny_model(arch)
    config = MendNetConfig(layers=(-1,), roles=("mlp_in", "mlp_out"), edit_lr_init=0.01, whiten_keys=True, whiten_damping=0.1)
    net = build_net(loaded, config).eval()
    texts = key_texts(facts)
    assert len(texts) == 2 * len(facts) and texts[:2] == [facts[0].prompt, "Alice plays chess"]
    set_key_preconditioners(net, key_second_moments(loaded, net.param_names, texts, batch_size=2))  # padded batches
    deltas = _dense(net(edit_pairs(loaded, facts, config, net.param_names, batch_size=2)))
    grads = _gradients(loaded, facts, net.param_names)
    for index, name in enumerate(net.param_names):
        moment = _input_second_moment(loaded, name, texts)
        dim = moment.shape[0]
        preconditioner = torch.linalg.inv(moment * dim / moment.trace() + 0.1 * torch.eye(dim, dtype=moment.dtype)).float()
        assert torch.allclose(net.key_preconditioner(index), preconditioner, rtol=1e-4, atol=1e-5), name
        assert not torch.allclose(preconditioner, torch.eye(dim), atol=1e-2)
        assert torch.allclose(deltas[name], -0.01 * grads[name] @ preconditioner, rtol=1e-3, atol=1e-6), name

    save_net(net, tmp_path / "editor", {"base_model": loaded.name})  # the preconditioners are part of the editor
    reloaded, _ = load_net(tmp_path / "editor")
    for index in range(len(net.param_names)):
        assert torch.equal(reloaded.key_preconditioner(index), net.key_preconditioner(index))
    with pytest.raises(ValueError, match="does not whiten keys"):
        set_key_preconditioners(build_net(loaded, MendNetConfig(layers=(-1,))), {})


def test_whitening_settings_are_checked():
    with pytest.raises(ValueError, match="whiten_damping"):
        MendNetConfig(whiten_keys=True, whiten_damping=0.0)
    with pytest.raises(ValueError, match="key_stats_rows"):
        MendTrainConfig(key_stats_rows=0)
