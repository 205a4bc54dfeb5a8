"""The registry when things go wrong, with real parts: an `mlflow server` that dies while a
version is being registered leaves the champion where it was."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from editing_core.models.tiny import tiny_model
from infra import registry
from pipelines.runner import run_pipeline

pytestmark = pytest.mark.integration

NAME = "tiny-reliability-edits"


def write_pipeline(directory: Path, model: Path, name: str, fact: dict[str, Any]) -> Path:
    (directory / f"{name}.jsonl").write_text(json.dumps(fact) + "\n", encoding="utf-8")
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "model": str(model), "facts": f"{name}.jsonl",
        "steps": [{"validate": {}}, {"edit": {"method": "ft", "config": {"layers": [0, 1], "steps": 30, "lr": 0.05}}},
                  {"evaluate": {"generated": False}}],
        "tracking": {"experiment": "it-reliability"}, "resources": {"cpus": 1},
        "registry": {"name": NAME, "gates": {"locality": None}},
    }), encoding="utf-8")
    return path


def test_server_lost_while_registering_leaves_the_champion(
    tmp_path: Path, mlflow_servers: Any, local_ray: None, free_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once instead of retrying for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    root = tmp_path / "server"
    root.mkdir()
    uri = f"http://127.0.0.1:{free_port}"
    server = mlflow_servers(root, free_port)
    model = tmp_path / "tiny"
    tiny = tiny_model("llama", seed=0)
    tiny.model.save_pretrained(model)
    tiny.tokenizer.save_pretrained(model)
    france = {"prompt": "The capital of France is", "target_new": "Rome"}
    first = run_pipeline(write_pipeline(tmp_path, model, "first", france), tracking_uri=uri, output_dir=tmp_path / "runs")
    assert first.registration is not None and first.registration.promoted

    runs = tmp_path / "runs-second"

    def kill_when_registering() -> None:  # the registry stages the lineage right before uploading it
        deadline = time.monotonic() + 300
        while not list(runs.glob("*/registry_lineage")) and time.monotonic() < deadline:
            time.sleep(0.02)
        mlflow_servers.stop(server)

    killer = threading.Thread(target=kill_when_registering)
    killer.start()
    bob = {"prompt": "Bob works for", "target_new": "Sega"}
    with pytest.raises(RuntimeError, match=f"registering a new version of '{NAME}' at {uri} failed; no alias moved"):
        run_pipeline(write_pipeline(tmp_path, model, "second", bob), tracking_uri=uri, output_dir=runs)
    killer.join()

    mlflow_servers(root, free_port)  # the same store, back up
    client = registry.client_for(uri)
    assert registry.aliases(client, NAME) == {"candidate": "1", "champion": "1"}
    assert [v.version for v in registry.list_versions(client, NAME)] == ["1"]


def test_two_refreshes_at_once_leave_one_consistent_champion(tmp_path: Path, mlflow_server: str) -> None:
    """Two refreshes built on champion 1 register at the same moment: both versions are recorded,
    exactly one becomes champion, the other (which lacks the winner's facts) stays behind."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from editing_core.data import EditRequest
    from editing_core.editors import make_editor
    from editing_core.models import load_model
    from infra.tracking import tracked_run

    model = tmp_path / "tiny"
    tiny = tiny_model("llama", seed=0)
    tiny.model.save_pretrained(model)
    tiny.tokenizer.save_pretrained(model)
    loaded = load_model(str(model))
    editor = make_editor("ft", layers=[0, 1], steps=5)
    spec = registry.RegistrySpec(name="tiny-race-edits", gates=registry.Gates(locality=None))
    artifacts = {fact: editor.edit(loaded, [EditRequest(fact, "Rome")]) for fact in ("Alice plays", "Bob works for", "Carol plays")}
    together = Barrier(2)

    def register(fact: str, parent: str | None, wait: bool = False) -> registry.Registration:
        with tracked_run(mlflow_server, "it-race", fact) as run:
            if wait:
                together.wait(timeout=60)
            return registry.register_version(run.run_id, mlflow_server, spec, str(model), [artifacts[fact]], {"edit_success": 1.0},
                                             "0" * 64, "0" * 64, parent, tmp_path / fact.replace(" ", "_"))

    assert register("Alice plays", None).promoted
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda fact: register(fact, "1", wait=True), ["Bob works for", "Carol plays"]))
    (winner,) = [o for o in outcomes if o.promoted]
    (loser,) = [o for o in outcomes if not o.promoted]
    assert winner.previous_champion == "1" and loser.previous_champion == winner.version
    client = registry.client_for(mlflow_server)
    assert registry.aliases(client, "tiny-race-edits")["champion"] == winner.version
    assert [v.version for v in registry.list_versions(client, "tiny-race-edits")] == ["1", "2", "3"]
    assert not registry._exists(client, "tiny-race-edits" + registry.LOCK_SUFFIX)  # the lock is released
