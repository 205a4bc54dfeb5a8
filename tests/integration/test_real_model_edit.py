"""FT+KL on the real SmolLM2-135M: the edit lands, stays local, and detaches exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from editing_core.artifacts import load_artifact
from editing_core.data import requests_from_dataset
from editing_core.editors import make_editor
from editing_core.evaluate import EvalConfig, evaluate
from editing_core.models import load_model

pytestmark = pytest.mark.integration

SHARED_DATA = Path(os.environ.get("EDITFLOW_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
N_FACTS = 4


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def counterfact_requests():
    path = SHARED_DATA / "counterfact" / "val.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    import datasets

    rows = json.loads(path.read_text(encoding="utf-8"))[: 2 * N_FACTS]
    return requests_from_dataset(datasets.Dataset.from_list(rows), f"{path.name}[:{2 * N_FACTS}]")


@pytest.fixture(scope="module")
def ft_kl_edit(smollm, counterfact_requests):
    # The default FT+KL anchors the KL term on the requests' own locality prompts (the texts the
    # user declared must not change), so this checks that the constraint holds. Locality on
    # prompts the editor never saw is measured by benchmarks/ft_vs_ftkl.py (docs/benchmarks.md).
    return make_editor("ft_kl").edit(smollm, counterfact_requests[:N_FACTS])


def _logits(loaded, text="The Eiffel Tower is located in the city of"):
    ids = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**ids).logits


def test_ft_kl_edit_succeeds_and_stays_local(smollm, counterfact_requests, ft_kl_edit):
    metrics = evaluate(smollm, counterfact_requests[:N_FACTS], ft_kl_edit, config=EvalConfig(generated=False)).metrics
    assert metrics["pre_edit_success"] < 0.5  # the model did not know the new facts
    assert metrics["edit_success"] >= 0.9
    assert metrics["locality"] >= 0.9


def test_detach_restores_outputs_exactly(smollm, ft_kl_edit):
    state = {k: v.clone() for k, v in smollm.model.state_dict().items()}
    base = _logits(smollm)
    with ft_kl_edit.attached(smollm.model):
        assert not torch.equal(_logits(smollm), base)
    assert torch.equal(_logits(smollm), base)
    assert all(torch.equal(state[k], v) for k, v in smollm.model.state_dict().items())


def test_saved_artifact_reloads_with_identical_metrics(smollm, counterfact_requests, ft_kl_edit, tmp_path):
    config = EvalConfig(generated=True)
    edited = counterfact_requests[:N_FACTS]
    original = evaluate(smollm, edited, ft_kl_edit, config=config).metrics
    reloaded = load_artifact(ft_kl_edit.save(tmp_path / "edit"))
    assert reloaded.meta.requests == tuple(edited)
    assert evaluate(smollm, edited, reloaded, config=config).metrics == original
