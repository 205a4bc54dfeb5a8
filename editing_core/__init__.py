"""editflow's pure core: models, facts, editors, artifacts and metrics.

Only torch, transformers, datasets and safetensors are used here; ray, mlflow and deepspeed
never are (tests/unit/test_core_is_pure.py enforces it). Importing this package does no work.
"""

__version__ = "0.1.0"
