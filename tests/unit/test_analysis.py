"""Importance / prune commands and the prune pipeline spec on a tiny model (no Ray: workers 0),
and the small helpers they rest on: round-robin shards, the pruning grid, removable share,
Spearman correlation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from editing_core.artifacts import load_artifact
from editing_core.config import ConfigError
from editing_core.importance import ImportanceConfig, load_tasks, removable_share, spearman
from editing_core.models.tiny import tiny_model
from pipelines.analysis import pruning_grid, read_scores, score_model
from pipelines.cli import main
from pipelines.spec import load_any_pipeline, load_pipeline
from tasks.importance import importance_shard, score_items
from tasks.sharding import run_sharded, split_round_robin

def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_round_robin_shards_cover_every_item_once() -> None:
    items = list(range(10))
    shards = split_round_robin(items, 3)
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert split_round_robin(items[:2], 5) == [[0], [1]]  # no empty shards
    with pytest.raises(ValueError, match=">= 1"):
        split_round_robin(items, 0)


def test_shard_sums_add_up_to_the_in_process_scores(copy_task: Callable[..., Path], tmp_path: Path) -> None:
    loaded = tiny_model("llama")
    tasks = load_tasks(copy_task(tmp_path / "tasks"))
    config = ImportanceConfig(batch_size=3)
    items = score_items(tasks, (0, 1), config)
    whole = importance_shard(loaded, items, {"shots": 0, "batch_size": 3, "max_rows": None, "progress": False})
    for parts in (2, 3):
        partials = [importance_shard(loaded, shard, {"shots": 0, "batch_size": 3, "max_rows": None, "progress": False})
                    for shard in split_round_robin(items, parts)]
        for key, expected in whole.items():
            total = partials[0][key]
            for partial in partials[1:]:
                total = total + partial[key]
            error = (total.head_abs_sum - expected.head_abs_sum).abs().max() / expected.head_abs_sum.abs().max()
            assert error < 1e-5 and total.rows == expected.rows and total.tokens == expected.tokens
    in_process = run_sharded("unused", importance_shard, items, {"shots": 0, "batch_size": 3, "max_rows": None, "progress": False},
                             workers=0, loaded=loaded)
    assert len(in_process) == 1 and set(in_process[0]) == set(whole)


def test_score_items_refuse_more_shots_than_examples(copy_task: Callable[..., Path], tmp_path: Path) -> None:
    tasks = load_tasks(copy_task(tmp_path / "tasks", examples=2))
    with pytest.raises(ValueError, match="5 shots asked"):
        score_items(tasks, (0, 5), ImportanceConfig())


def test_pruning_grid_and_removable_share() -> None:
    assert pruning_grid((0.5, 0.25), (0.2,)) == [(0.0, 0.0), (0.25, 0.0), (0.5, 0.0), (0.0, 0.2)]
    rows = [{"heads": h, "ffn": 0.0, "shots": 0, "task": t, "accuracy": a}
            for h, accs in ((0.0, (0.80, 0.60)), (0.25, (0.80, 0.595)), (0.5, (0.70, 0.60)), (0.75, (0.80, 0.60)))
            for t, a in zip("ab", accs)]
    # mean accuracy 0.70, 0.6975, 0.65, 0.70: the largest fraction within one point is 0.75
    assert removable_share(rows, "heads", 0) == 0.75
    assert removable_share(rows[:4], "heads", 0) == 0.25
    with pytest.raises(ValueError, match="no unpruned point"):
        removable_share(rows[2:], "heads", 0)


def test_taylor_scores_are_minus_the_gate_gradient_per_row(copy_task: Callable[..., Path], tmp_path: Path) -> None:
    from editing_core.importance import gate_gradients, importance_sums, select_rows

    loaded = tiny_model("llama")
    rows = select_rows(load_tasks(copy_task(tmp_path))[0])
    sums = importance_sums(loaded, rows, 1)
    head_grad, ffn_grad = gate_gradients(loaded, rows, 1)
    assert torch.allclose(sums.head_taylor(), -head_grad / len(rows), rtol=1e-4, atol=1e-7)
    assert torch.allclose(sums.ffn_taylor(), -ffn_grad / len(rows), rtol=1e-4, atol=1e-7)
    assert torch.equal(sums.ranking_scores("taylor")[0], sums.head_taylor())
    with pytest.raises(ValueError, match="unknown ranking"):
        sums.ranking_scores("random")


def test_spearman_ranks_ties_and_constant_tables() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties get their mean rank: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.arange(4.0)) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(spearman(torch.ones(4), torch.arange(4.0)))


def test_importance_and_prune_commands(copy_task: Callable[..., Path], tiny_llama_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = copy_task(tmp_path / "tasks")
    scores_dir, pruned_dir = tmp_path / "scores", tmp_path / "pruned"
    code, out, err = run(["importance", "--model", tiny_llama_dir, "--tasks", str(tasks), "--shots", "0,1", "--ablation",
                          "--induction", "--out", str(scores_dir)], capsys)
    assert code == 0, err
    document = json.loads((scores_dir / "importance.json").read_text())
    assert document["layers"] == 2 and document["heads"] == 4 and document["workers"] == 0
    assert {(r["task"], r["shots"]) for r in document["by_task"]} == {("copy", 0), ("copy", 1)}
    assert "spearman" in document["ablation"] and len(document["induction"]["prefix_matching"]) == 2
    for png in ("heads.png", "ffn.png", "induction.png"):
        assert (scores_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head, ffn, _ = read_scores(scores_dir)
    assert head.shape == (2, 4) and ffn.shape == (2,)

    code, out, err = run(["prune", "--model", tiny_llama_dir, "--scores", str(scores_dir), "--eval", str(tasks), "--shots", "0,1",
                          "--heads", "0.5", "--ffn", "0.5", "--curve-heads", "0.25,0.5", "--curve-ffn", "0.5",
                          "--out", str(pruned_dir)], capsys)
    assert code == 0, err
    pruned = json.loads((pruned_dir / "prune.json").read_text())
    assert len(pruned["removed"]["heads"]) == 4 and len(pruned["removed"]["ffn"]) == 1
    curve = json.loads((pruned_dir / "curves.json").read_text())
    assert {(r["heads"], r["ffn"]) for r in curve} == {(0.0, 0.0), (0.25, 0.0), (0.5, 0.0), (0.0, 0.5)}
    assert (pruned_dir / "curves.png").exists()
    artifact = load_artifact(pruned_dir / "artifact")
    assert artifact.meta.method == "prune" and artifact.meta.config == pruned["removed"]

    code, _, err = run(["prune", "--model", tiny_llama_dir, "--scores", str(scores_dir), "--eval", str(tasks), "--shots", "0",
                        "--heads", "0.25", "--curve-heads", "0.25", "--curve-ffn", "", "--rank-by", "taylor", "--iterative",
                        "--out", str(tmp_path / "taylor")], capsys)
    assert code == 0, err
    taylor = torch.tensor(document["head_taylor"])
    weakest = {tuple(divmod(int(i), 4)) for i in taylor.flatten().argsort()[:2]}
    assert {tuple(h) for h in json.loads((tmp_path / "taylor" / "prune.json").read_text())["removed"]["heads"]} == weakest


def test_prune_command_input_errors(copy_task: Callable[..., Path], tiny_llama_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = copy_task(tmp_path / "tasks", examples=1)
    code, _, err = run(["importance", "--model", tiny_llama_dir, "--tasks", str(tasks), "--shots", "0,5", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "task copy: --shots 5 needs that many examples per row; it has 1" in err
    code, _, err = run(["prune", "--model", tiny_llama_dir, "--scores", str(tmp_path / "nothing"), "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "no importance scores here" in err
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "examples": [], "query": "Paris", "answer": ""}\n')
    (tmp_path / "badtasks").mkdir()
    (tmp_path / "bad.jsonl").rename(tmp_path / "badtasks" / "bad.jsonl")
    code, _, err = run(["importance", "--model", tiny_llama_dir, "--tasks", str(tmp_path / "badtasks"), "--shots", "0",
                        "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and "bad.jsonl row 1" in err and "'answer'" in err


def write_prune_yaml(directory: Path, **fields: object) -> Path:
    document = {"kind": "prune", "name": "p", "model": "tiny", "shots": [0, 1], "workers": 0, **fields}
    path = directory / "prune.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_prune_pipeline_spec_loads_and_names_bad_fields(copy_task: Callable[..., Path], tmp_path: Path) -> None:
    copy_task(tmp_path / "tasks")
    spec = load_any_pipeline(write_prune_yaml(tmp_path, tasks="tasks", heads=0.3))
    assert spec.pipeline.heads == 0.3 and [t.name for t in spec.tasks] == ["copy"]
    assert spec.importance_config().shots == 0
    shipped = load_any_pipeline(write_prune_yaml(tmp_path))
    assert len(shipped.tasks) >= 3  # the tasks that ship with editflow
    cases = [
        (dict(heads=1.5), "heads: a fraction in [0, 1]"),
        (dict(workers=-1), "workers: must be >= 0"),
        (dict(tasks="missing"), "tasks: 'missing' file not found"),
        (dict(tasks="tasks", shots=[0, 6]), "task copy has 5"),
        (dict(colour="red"), "colour"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match="prune.yaml") as error:
            load_any_pipeline(write_prune_yaml(tmp_path, **fields))
        assert message in str(error.value)
    with pytest.raises(ConfigError, match="kind: 'prune': this needs an edit pipeline"):
        load_pipeline(write_prune_yaml(tmp_path))


def test_score_model_needs_tasks() -> None:
    with pytest.raises(ValueError, match="no tasks"):
        score_model("tiny", [], (0,), ImportanceConfig(), loaded=tiny_model("llama"))


def test_the_example_prune_pipeline_loads() -> None:
    spec = load_any_pipeline(Path(__file__).resolve().parents[2] / "pipelines" / "examples" / "prune_smollm2.yaml")
    assert spec.pipeline.workers == 2 and spec.pipeline.model == "smollm2-135m" and len(spec.tasks) == 4


def test_the_copy_task_is_in_the_tiny_vocabulary(copy_task: Callable[..., Path], tmp_path: Path) -> None:
    from editing_core.models.tiny import WORDS

    rows = load_tasks(copy_task(tmp_path))[0].rows
    assert {row.query for row in rows} <= set(WORDS)  # not [UNK] soup
