"""Ray Serve over real HTTP on 127.0.0.1: registered versions of a tiny saved model, a real
`mlflow server`, a real local Ray. Rollback changes what /generate answers, without a restart."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from editing_core.artifacts import attached_chain
from editing_core.data import EditRequest
from editing_core.editors import make_editor
from editing_core.evaluate import generate_texts
from editing_core.models import load_model
from editing_core.models.tiny import tiny_model
from infra import registry
from infra.serve import ServeOptions, start
from infra.tracking import tracked_run

pytestmark = pytest.mark.integration

NAME = "tiny-serve-edits"
FRANCE = EditRequest("The capital of France is", "Rome")
BOB = EditRequest("Bob works for", "Sega")


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def get(url: str, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"{url}{path}", timeout=30) as response:
        return response.status, response.read()


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> dict[str, list[str]]:
    """Versions 1 (France) and 2 (France + Bob) of NAME; champion 2. Returns the greedy answers
    of each version to [FRANCE, BOB] computed in this process."""
    directory = tmp_path_factory.mktemp("tiny-serve")
    tiny = tiny_model("llama", seed=0)
    tiny.model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    loaded = load_model(str(directory))
    editor = make_editor("ft", layers=[0, 1], steps=30, lr=0.05)
    first = editor.edit(loaded, [FRANCE])
    with attached_chain(loaded.model, [first]):
        second = editor.edit(loaded, [BOB], parent=first)
    answers: dict[str, list[str]] = {}
    spec = registry.RegistrySpec(name=NAME, gates=registry.Gates(locality=None))
    for version, lineage in (("1", [first]), ("2", [first, second])):
        with tracked_run(mlflow_server, "it-serve", f"v{version}") as run:
            registration = registry.register_version(
                run.run_id, mlflow_server, spec, str(directory), lineage, {"edit_success": 1.0}, "0" * 64, "0" * 64,
                parent_version=None if version == "1" else "1", workdir=tmp_path_factory.mktemp(f"v{version}"),
            )
        assert registration.version == version and registration.promoted
        with attached_chain(loaded.model, lineage):
            answers[version] = generate_texts(loaded, [FRANCE.prompt, BOB.prompt], 2)
    return answers


@pytest.fixture(scope="module")
def served(two_versions: dict[str, list[str]], mlflow_server: str, local_ray: None, free_port: int) -> Iterator[str]:
    from ray import serve

    url = start(ServeOptions(name=NAME, tracking_uri=mlflow_server, refresh_s=1.0), port=free_port)
    try:
        yield url
    finally:
        serve.shutdown()


def test_generate_answers_with_the_champion_and_says_which_version(served: str, two_versions: dict[str, list[str]]) -> None:
    status, france = post(served, {"prompt": FRANCE.prompt, "max_new_tokens": 2})
    assert status == 200 and france == {"text": two_versions["2"][0], "version": "2", "name": NAME, "alias": "champion"}
    assert france["text"].startswith("Rome")
    status, bob = post(served, {"prompt": BOB.prompt, "max_new_tokens": 2})
    assert status == 200 and bob["text"] == two_versions["2"][1] and bob["text"].startswith("Sega")


def test_a_version_is_chosen_per_request(served: str, two_versions: dict[str, list[str]]) -> None:
    status, old = post(served, {"prompt": BOB.prompt, "max_new_tokens": 2, "version": "1"})
    assert status == 200 and old["version"] == "1" and old["text"] == two_versions["1"][1]
    assert not old["text"].startswith("Sega")
    status, routed = post(served, {"prompt": BOB.prompt, "max_new_tokens": 2}, {"serve_multiplexed_model_id": "1"})
    assert status == 200 and routed["version"] == "1" and routed["text"] == two_versions["1"][1]
    status, missing = post(served, {"prompt": BOB.prompt, "version": "99"})
    assert status == 404 and "no version '99'" in missing["detail"]
    status, invalid = post(served, {"prompt": "", "max_new_tokens": 0})
    assert status == 422


def test_health_and_openapi_docs(served: str) -> None:
    status, body = get(served, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = get(served, "/openapi.json")
    assert status == 200 and "/generate" in json.loads(body)["paths"]
    assert get(served, "/docs")[0] == 200


def test_rollback_switches_the_served_version_without_a_restart(served: str, mlflow_server: str, two_versions: dict[str, list[str]]) -> None:
    client = registry.client_for(mlflow_server)
    assert registry.rollback(client, NAME) == ("2", "1")
    try:
        deadline = time.monotonic() + 30
        while True:
            status, answer = post(served, {"prompt": BOB.prompt, "max_new_tokens": 2})
            assert status == 200
            if answer["version"] == "1" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert answer == {"text": two_versions["1"][1], "version": "1", "name": NAME, "alias": "champion"}
    finally:
        registry.promote(client, NAME, "2")


def test_the_base_version_is_the_unedited_model(served: str, two_versions: dict[str, list[str]]) -> None:
    status, base = post(served, {"prompt": FRANCE.prompt, "max_new_tokens": 2, "version": "base"})
    assert status == 200 and base["version"] == "base"
    assert not base["text"].startswith("Rome") and base["text"] != two_versions["1"][0]
