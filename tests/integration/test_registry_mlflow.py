"""The edit registry against a real `mlflow server`, a real local Ray and a tiny saved model.

Three pipeline runs make three versions: the second builds on the first (its lineage carries
both facts), the third fails a gate and stays candidate. The registered pyfunc answers with the
edits of its version; a rollback makes the champion answer exactly as the earlier version did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from editing_core.models.tiny import tiny_model
from infra import registry
from pipelines.cli import main
from pipelines.runner import run_pipeline

pytestmark = pytest.mark.integration

NAME = "tiny-it-edits"
FT = {"layers": [0, 1], "steps": 30, "lr": 0.05}
FRANCE = {"prompt": "The capital of France is", "target_new": "Rome", "locality_prompt": "Alice plays", "locality_answer": "chess"}
BOB = {"prompt": "Bob works for", "target_new": "Sega", "locality_prompt": "Carol plays the", "locality_answer": "piano"}
DAVE = {"prompt": "Dave plays", "target_new": "guitar"}
PROMPTS = pd.DataFrame({"prompt": [FRANCE["prompt"], BOB["prompt"]]})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny = tiny_model("llama", seed=0)
    tiny.model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    return directory


def write_pipeline(directory: Path, model: Path, name: str, facts: list[dict[str, Any]], gates: dict[str, Any]) -> Path:
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts), encoding="utf-8")
    document = {
        "name": name, "model": str(model), "facts": f"{name}.jsonl",
        "steps": [{"validate": {}}, {"edit": {"method": "ft", "config": FT}}, {"evaluate": {"generated": False}}],
        "tracking": {"experiment": "it-registry"}, "resources": {"cpus": 1},
        "registry": {"name": NAME, "gates": gates},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def edits(capsys: pytest.CaptureFixture[str], uri: str, *args: str) -> Any:
    """`editflow edits ... --json`; its JSON is the last stdout line (Ray forwards worker logs to stdout)."""
    capsys.readouterr()
    assert main(["edits", *args, "--tracking-uri", uri, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def answers(uri: str, reference: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.pyfunc.load_model(reference).predict(PROMPTS, params={"max_new_tokens": 1})


def test_versions_lineage_gates_promote_and_rollback(
    chdir_tmp: Path, tiny_dir: Path, mlflow_server: str, local_ray: None,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, runs = mlflow_server, chdir_tmp / "runs"
    loose = {"edit_success": 0.9, "locality": None}

    first = run_pipeline(write_pipeline(chdir_tmp, tiny_dir, "france", [FRANCE], loose), tracking_uri=uri, output_dir=runs)
    assert first.registration is not None and first.registration.version == "1" and first.registration.promoted

    second = run_pipeline(write_pipeline(chdir_tmp, tiny_dir, "bob", [BOB], loose), tracking_uri=uri, output_dir=runs)
    assert second.registration is not None and second.registration.promoted
    assert second.registration.previous_champion == "1"

    # a gate that cannot pass (no rephrases: paraphrase is not measured) leaves the champion alone
    strict = {**loose, "paraphrase": 0.5}
    third = run_pipeline(write_pipeline(chdir_tmp, tiny_dir, "gated", [DAVE], strict), tracking_uri=uri, output_dir=runs)
    assert third.registration is not None and not third.registration.promoted
    assert third.registration.gate_failures == ("paraphrase was not measured (gate 0.5)",)

    versions = {v["version"]: v for v in edits(capsys, uri, "list", NAME)}
    assert versions["1"]["n_edits"] == 1 and versions["1"]["parent_version"] is None
    assert versions["2"]["n_edits"] == 2 and versions["2"]["parent_version"] == "1"  # built on the champion
    assert versions["2"]["aliases"] == ["champion"] and versions["3"]["aliases"] == ["candidate"]
    assert versions["3"]["gates"].startswith("failed: paraphrase")
    assert versions["2"]["metrics"]["edit_success"] == pytest.approx(second.metrics["edit_success"])

    diff = edits(capsys, uri, "diff", NAME, "1", "2")
    assert [f["prompt"] for f in diff["added"]] == [BOB["prompt"]] and diff["removed"] == []
    shown = edits(capsys, uri, "show", NAME)
    assert shown["version"] == "2" and [f["target_new"] for f in shown["facts"]] == ["Rome", "Sega"]

    v1, champion = answers(uri, f"models:/{NAME}/1", monkeypatch), answers(uri, f"models:/{NAME}@champion", monkeypatch)
    assert champion == ["Rome", "Sega"]  # both accepted edits are in the champion
    assert v1[0] == "Rome" and v1[1] != "Sega"

    assert edits(capsys, uri, "rollback", NAME) == {"champion": "1", "rolled_back": "2"}
    assert answers(uri, f"models:/{NAME}@champion", monkeypatch) == v1
    assert edits(capsys, uri, "promote", NAME, "2") == {"champion": "2", "previous": "1"}
    assert registry.aliases(registry.client_for(uri), NAME) == {"champion": "2", "candidate": "3"}


def test_a_champion_of_another_base_model_is_refused(chdir_tmp: Path, tiny_dir: Path, mlflow_server: str, local_ray: None) -> None:
    from editing_core.config import ConfigError

    other = chdir_tmp / "other-model"
    tiny = tiny_model("llama", seed=1)
    tiny.model.save_pretrained(other)
    tiny.tokenizer.save_pretrained(other)
    run_pipeline(write_pipeline(chdir_tmp, tiny_dir, "base", [FRANCE], {"locality": None}), tracking_uri=mlflow_server,
                 output_dir=chdir_tmp / "runs")
    path = write_pipeline(chdir_tmp, other, "other", [BOB], {"locality": None})
    with pytest.raises(ConfigError, match="edits .*tiny-llama.*not this pipeline's model"):
        run_pipeline(path, tracking_uri=mlflow_server, output_dir=chdir_tmp / "runs")
