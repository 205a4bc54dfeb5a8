"""SaLEM layer saliency sharded on a real local Ray: the scores do not depend on the worker count
or on where the workers get the weights (loaded by name, or one object-store copy of the
driver's model), and `editflow saliency` on SmolLM2-135M with 2 workers writes its JSON and PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from editing_core.data import EditRequest
from editing_core.models import load_model
from editing_core.saliency import SaliencyConfig, SaliencySums, build_samples, saliency_sums
from pipelines.cli import main
from tasks.saliency import sharded_saliency

pytestmark = pytest.mark.integration



def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("share_weights", [False, True], ids=["load-by-name", "object-store"])
def test_sharded_saliency_equals_in_process_for_1_2_3_workers(tiny_llama_dir: str, facts: list[EditRequest],
                                                              local_ray: None, share_weights: bool) -> None:
    loaded = load_model(tiny_llama_dir)
    samples = build_samples(loaded, facts)
    config = SaliencyConfig()
    reference = saliency_sums(loaded, samples, config)
    assert reference.counts.tolist() == [3, 2, 3]
    for workers in (1, 2, 3):
        # 3 workers x 0.5 CPU fit the 2-CPU test cluster
        total = sharded_saliency(tiny_llama_dir, samples, config, workers=workers, cpus_per_worker=0.5,
                                 loaded=loaded, share_weights=share_weights)
        assert isinstance(total, SaliencySums) and torch.equal(total.counts, reference.counts)
        assert relative_error(total.abs_sum, reference.abs_sum) < 1e-5
        assert relative_error(total.fro_sum, reference.fro_sum) < 1e-5
        scores, expected = total.scores(), reference.scores()
        assert relative_error(scores.layer_scores, expected.layer_scores) < 1e-5
        assert scores.chosen_layer == expected.chosen_layer


def test_saliency_command_on_smollm2_with_two_workers(tmp_path: Path, local_ray: None, smollm2_available: None,
                                                      counterfact_rows: Callable[..., list[dict]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(counterfact_rows(5, "val")), encoding="utf-8")  # about 15 samples, ~1 s each
    out = tmp_path / "saliency"
    code = main(["saliency", "--model", "smollm2-135m", "--facts", str(facts), "--workers", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads((out / "saliency.json").read_text())
    assert document["workers"] == 2 and document["layers"] == 30
    assert document["counts"]["fail"] == 5 and document["counts"]["adapt"] == 5 and 1 <= document["counts"]["pass"] <= 5
    assert 0 <= document["chosen_layer"] < 30
    layer = torch.tensor(document["layer_scores"])
    assert layer.shape == (30,) and bool((layer > 0).all()) and int(layer.argmax()) == document["chosen_layer"]
    assert set(document["by_group"]) == {"fail", "adapt", "pass"}
    # the new (counterfactual) facts are harder for the model than the answers it gives itself
    assert document["by_group"]["fail"]["mean_nll"] > document["by_group"]["pass"]["mean_nll"]
    assert (out / "saliency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
