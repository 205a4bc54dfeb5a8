"""A scheduled refresh end to end: `editflow scheduler run --once` runs a due refresh pipeline
(facts from a directory) on a local Ray, which registers a new champion in a real `mlflow
server`; the same facts again register nothing (they are already in the champion)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from editing_core.models.tiny import tiny_model
from infra import registry
from infra.scheduler import ScheduleStore
from pipelines.cli import main

pytestmark = pytest.mark.integration

NAME = "tiny-refresh-edits"
FACTS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "locality_prompt": "Alice plays", "locality_answer": "chess"},
    {"prompt": "Bob works for", "target_new": "Sega", "locality_prompt": "Carol plays the", "locality_answer": "piano"},
]


def test_scheduler_runs_a_due_refresh_that_registers_a_champion(
    tmp_path: Path, mlflow_server: str, local_ray: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "tiny"
    tiny = tiny_model("llama", seed=0)
    tiny.model.save_pretrained(model)
    tiny.tokenizer.save_pretrained(model)
    (tmp_path / "incoming").mkdir()
    for i, fact in enumerate(FACTS):  # one facts file per arrival
        (tmp_path / "incoming" / f"{i:02d}.jsonl").write_text(json.dumps(fact) + "\n", encoding="utf-8")
    pipeline = tmp_path / "refresh.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "refresh", "model": str(model), "facts": "incoming",
        "steps": [{"validate": {}}, {"edit": {"method": "ft", "config": {"layers": [0, 1], "steps": 30, "lr": 0.05}}},
                  {"evaluate": {"generated": False}}],
        "tracking": {"experiment": "it-refresh"}, "resources": {"cpus": 1},
        "registry": {"name": NAME, "gates": {"locality": None}},
    }), encoding="utf-8")
    state = tmp_path / "schedules.db"
    store = ScheduleStore(state)
    store.add("nightly", "0 3 * * *", pipeline, tracking_uri=mlflow_server, now=time.time() - 2 * 86400)

    capsys.readouterr()
    assert main(["scheduler", "run", "--once", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert f"nightly: succeeded (run " in out and f"{NAME} version 1 champion" in out
    assert registry.aliases(registry.client_for(mlflow_server), NAME)["champion"] == "1"
    assert main(["scheduler", "run", "--once", "--state", str(state)]) == 0  # not due again until tomorrow
    assert "nightly" not in capsys.readouterr().out

    store.add("again", "* * * * *", pipeline, tracking_uri=mlflow_server, now=time.time() - 120)
    assert main(["scheduler", "run", "--once", "--state", str(state)]) == 0
    assert "again: succeeded" in (out := capsys.readouterr().out) and "no new version" in out, out
    assert registry.aliases(registry.client_for(mlflow_server), NAME) == {"candidate": "1", "champion": "1"}
    assert main(["schedule", "list", "--state", str(state), "--json"]) == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out.strip().splitlines()[-1])}
    assert listed["nightly"]["last_status"] == "succeeded" and listed["again"]["running"] is False
