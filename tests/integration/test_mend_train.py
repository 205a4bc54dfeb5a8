"""MEND editor training on a real local Ray (Ray Train) with real DeepSpeed ZeRO on the CPU
accelerator (gloo): a run survives one injected worker crash by resuming from its checkpoint;
rerunning resumes a stopped run; a trained editor for SmolLM2-135M reloads and edits through
the CLI. (That a resumed run ends exactly where an uninterrupted one ends was checked when this
was written, editor weights equal to 1e-6; the rows of a step depend only on (seed, rank, step).)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest
import torch

from editing_core.artifacts import load_artifact
from editing_core.data import EditRequest
from editing_core.editors import make_editor
from editing_core.editors.mend import (MendNetConfig, MendTrainConfig, build_net, key_second_moments, key_texts, load_net,
                                       set_key_preconditioners)
from editing_core.models import load_model
from editing_core.tokens import completion_batch, completion_logits
from pipelines.cli import main
from tasks.mend_train import DistributedConfig, train_editor

pytestmark = pytest.mark.integration

NET = MendNetConfig(layers=(0, 1), rank=4)
ZERO2_OFFLOAD = DistributedConfig(workers=2, zero_stage=2, offload=True, max_failures=1)


def _train(model: str, facts: list[EditRequest], out: Path, steps: int, fail_once_at: int | None = None):
    train = MendTrainConfig(steps=steps, batch_size=2, checkpoint_every=4, val_every=8, lr=1e-2)
    return train_editor(model, facts, facts[:2], NET, train, ZERO2_OFFLOAD, out, {"test": True}, fail_once_at)


def test_zero2_offload_training_survives_a_worker_crash_and_resumes(tiny_llama_dir: str, facts: list[EditRequest],
                                                                    local_ray: None, tmp_path: Path) -> None:
    crashed = _train(tiny_llama_dir, facts, tmp_path / "crashed", steps=12, fail_once_at=6)
    assert "killed itself at step 6" in (tmp_path / "crashed" / "injected_failure.txt").read_text()
    assert [h["step"] for h in crashed.history] == [4, 8, 12]  # step 4's checkpoint carried the history over
    assert "val_loss" in crashed.history[1] and crashed.history[-1]["peak_rss_mib"] > 0

    crashed_net, document = load_net(crashed.editor_dir)
    assert document["trained_steps"] == 12 and document["test"] is True
    # the edit rates started at their calibrated values, and the document kept them across the crash
    assert len(document["edit_lr_calibration"]) == len(crashed_net.targets)
    assert set(document["edit_lr_calibration"]) <= set(MendTrainConfig().edit_lr_grid)
    assert any(v.abs().max() > 0 for k, v in crashed_net.state_dict().items() if k.endswith(".up")), \
        "training left the editor at its identity initialisation"

    # the same run, asked for more steps: it continues from its step-12 checkpoint
    resumed = _train(tiny_llama_dir, facts, tmp_path / "crashed", steps=16)
    assert [h["step"] for h in resumed.history] == [4, 8, 12, 16]
    assert resumed.history[:3] == crashed.history

    loaded = load_model(tiny_llama_dir)
    artifact = make_editor("mend", editor=str(resumed.editor_dir), check_base=False).edit(loaded, facts)
    assert {d.rank for d in artifact.deltas.values()} and all(d.dense is None for d in artifact.deltas.values())
    batch = completion_batch(loaded.tokenizer, [(facts[0].prompt, facts[0].target_new)])
    before = completion_logits(loaded.model, batch)
    with artifact.attached(loaded.model):
        assert not torch.allclose(completion_logits(loaded.model, batch), before)
    assert torch.equal(completion_logits(loaded.model, batch), before)


def test_cosine_schedule_and_best_validation_editor_under_ddp(tiny_llama_dir: str, facts: list[EditRequest],
                                                              local_ray: None, tmp_path: Path) -> None:
    # plain DDP; two validation rows: each of the two workers scores one, the sums are all-reduced;
    # the editor whitens its keys with second moments of the first two facts' texts
    train = MendTrainConfig(steps=8, batch_size=2, checkpoint_every=2, val_every=2, lr=3e-2, lr_schedule="cosine",
                            lr_min_ratio=0.1, select_by="locality_kl", edit_lr_grid=(), key_stats_rows=2)
    net = replace(NET, whiten_keys=True)
    result = train_editor(tiny_llama_dir, facts, facts[:2], net, train, DistributedConfig(workers=2, zero_stage=0),
                          tmp_path / "ddp", {"test": True})
    lrs = [h["lr"] for h in result.history]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(3e-3) and lrs[0] < 3e-2
    val = {int(h["step"]): h["val_locality_kl"] for h in result.history}
    assert len(val) == 4
    best_step = min(val, key=val.get)  # the edits of a learning editor move the locality texts more and more
    assert result.selected_step == best_step < 8
    _, chosen = load_net(result.editor_dir)
    assert chosen["trained_steps"] == best_step and chosen["selected_by"] == "val_locality_kl"
    assert load_net(tmp_path / "ddp" / "last_editor")[1]["trained_steps"] == 8

    loaded = load_model(tiny_llama_dir)
    expected = build_net(loaded, net)
    set_key_preconditioners(expected, key_second_moments(loaded, expected.param_names, key_texts(facts[:2])))
    trained, _ = load_net(result.editor_dir)
    for index in range(len(trained.targets)):
        assert torch.allclose(trained.key_preconditioner(index), expected.key_preconditioner(index), atol=1e-5)
        assert not torch.allclose(trained.key_preconditioner(index), torch.eye(trained.targets[index][1]), atol=1e-2)


def test_train_editor_then_edit_on_smollm2(tmp_path: Path, local_ray: None, smollm2_available: None,
                                                    counterfact_rows: Callable[..., list[dict]],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    train.write_text(json.dumps(counterfact_rows(8, "train")), encoding="utf-8")
    val.write_text(json.dumps(counterfact_rows(2, "val")), encoding="utf-8")
    out = tmp_path / "mend"
    config = tmp_path / "train.yaml"  # a short edit-rate search: two rates on one batch
    config.write_text("edit_lr_grid: [1.0e-3, 1.0e-2]\ncalibration_rows: 2\n", encoding="utf-8")
    code = main(["train-editor", "--model", "smollm2-135m", "--facts", str(train), "--val", str(val), "--steps", "4",
                 "--batch-size", "2", "--workers", "2", "--zero-stage", "2", "--offload", "--no-mlflow", "--config", str(config),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "trained 4 steps on 2 worker(s) (ZeRO stage 2, offload)" in captured.out
    assert (out / "training.png").stat().st_size > 0
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["step"] == 4 and history[-1]["edit_nll"] > 0 and "val_edit_nll" in history[-1]
    assert set(load_net(out / "editor")[1]["edit_lr_calibration"]) <= {1e-3, 1e-2}

    artifact_dir = tmp_path / "edit"
    code = main(["edit", "--model", "smollm2-135m", "--method", "mend", "--editor", str(out / "editor"),
                 "--facts", str(val), "--out", str(artifact_dir)])
    assert code == 0, capsys.readouterr().err
    artifact = load_artifact(artifact_dir)
    assert artifact.meta.method == "mend" and len(artifact.deltas) == 6  # mlp_in + mlp_out of the last 3 layers
    assert all(d.dense is None and d.rank >= 2 for d in artifact.deltas.values())
