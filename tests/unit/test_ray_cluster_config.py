"""ray_cluster.yaml is a valid Ray cluster launcher config (Ray's own defaults and JSON schema)."""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


def test_cluster_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CONFIG.read_text(encoding="utf-8")))
    validate_config(config)  # raises jsonschema.ValidationError / ValueError when invalid
    assert config["provider"]["type"] == "local"
    assert config["max_workers"] == len(config["provider"]["worker_ips"])


def test_cluster_installs_the_project_and_keeps_the_dashboard_on_loopback() -> None:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    assert any("make install" in command for command in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=disabled" not in head


def test_the_schema_check_can_fail() -> None:
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    config["min_wokers"] = 2  # a typo
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validate_config(prepare_config(config))
