"""Submitting a pipeline as a Ray job to a real head started with `ray start --head` on
127.0.0.1 (token authentication left on), recorded in a real `mlflow server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from editing_core.models.tiny import tiny_model
from infra import registry
from pipelines.cli import main

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
FACT = {"prompt": "The capital of France is", "target_new": "Rome", "locality_prompt": "Alice plays", "locality_answer": "chess"}


@pytest.fixture(scope="module")
def ray_head(free_port: int) -> Iterator[str]:
    """A Ray head on 127.0.0.1 (its own temp dir and ports); the Jobs API address. The project's
    venv is first on the head's PATH, as ray_cluster.yaml arranges on real nodes."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        gcs_port = sock.getsockname()[1]
    temp_dir = tempfile.mkdtemp(prefix="/tmp/efray-")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port}", "--num-cpus=2", f"--temp-dir={temp_dir}",
             "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, timeout=180, capture_output=True)
    try:
        yield f"http://127.0.0.1:{free_port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, timeout=180, capture_output=True)


def write_pipeline(directory: Path, model: Path, name: str) -> Path:
    (directory / "facts").mkdir()
    (directory / "facts" / "facts.jsonl").write_text(json.dumps(FACT) + "\n", encoding="utf-8")
    document = {
        "name": name, "model": str(model), "facts": "facts/facts.jsonl",
        "steps": [{"validate": {}}, {"edit": {"method": "ft", "config": {"layers": [0, 1], "steps": 30, "lr": 0.05}}},
                  {"evaluate": {"generated": False}}],
        "tracking": {"experiment": "it-submit"}, "resources": {"cpus": 1},
        "registry": {"name": "tiny-submit-edits", "gates": {"locality": None}},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_submitted_pipeline_runs_on_the_cluster_and_registers_a_version(
    tmp_path: Path, ray_head: str, mlflow_server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "")  # unset for editflow (which turns token auth on); restored afterwards
    model = tmp_path / "tiny"
    tiny = tiny_model("llama", seed=0)
    tiny.model.save_pretrained(model)
    tiny.tokenizer.save_pretrained(model)
    path = write_pipeline(tmp_path, model, "submitted")

    status = main(["submit", str(path), "--address", ray_head, "--tracking-uri", mlflow_server, "--wait"])
    out = capsys.readouterr().out
    assert status == 0, out
    job_id = out.split("submitted ", 1)[1].split()[0]
    assert out.rstrip().endswith(f"{job_id}: SUCCEEDED") and "registry:      tiny-submit-edits version 1, champion" in out

    assert main(["jobs", "list", "--address", ray_head, "--json"]) == 0
    listed = {row["job_id"]: row for row in json.loads(capsys.readouterr().out)}
    assert listed[job_id]["status"] == "SUCCEEDED" and listed[job_id]["metadata"]["editflow_pipeline"] == "submitted"
    assert registry.aliases(registry.client_for(mlflow_server), "tiny-submit-edits") == {"candidate": "1", "champion": "1"}
