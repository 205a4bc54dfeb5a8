"""The MLflow pyfunc of a registered edit version (MLflow "models from code").

MLflow stores this file with every version and imports it when the version is loaded
(`mlflow.pyfunc.load_model`, `mlflow models serve`); the `set_model` call at the bottom is how
models from code declare their model, and it only registers the object. Loading reads the base
model id from the model config, loads it with editflow's loader (hub id, directory, .gguf or the
`smollm2-135m` alias) and attaches the version's edit artifacts in lineage order.

Input: a DataFrame with a `prompt` column (or a list of prompts, or {"prompt": ...});
param `max_new_tokens` (default 32). Output: the greedy continuations, one string per prompt.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

DEFAULT_MAX_NEW_TOKENS = 32


class EditedModel(PythonModel):
    """Base model + the version's lineage of edit artifacts, attached once at load."""

    def load_context(self, context: Any) -> None:
        from editing_core.artifacts import check_chain, load_artifact
        from editing_core.models import load_model

        self.loaded = load_model(context.model_config["base_model"])
        keys = sorted(k for k in context.artifacts if k.startswith("edit_"))
        self.artifacts = [load_artifact(context.artifacts[k]) for k in keys]
        check_chain(self.artifacts)
        for artifact in self.artifacts:
            artifact.attach(self.loaded.model)

    def predict(self, context, model_input, params=None):  # untyped: MLflow would infer a schema from hints
        from editing_core.evaluate import generate_texts

        max_new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        return generate_texts(self.loaded, _prompts(model_input), max_new_tokens)


def _prompts(model_input: Any) -> list[str]:
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        if "prompt" not in model_input.columns:
            raise ValueError(f"expected a 'prompt' column, got {list(model_input.columns)}")
        return [str(p) for p in model_input["prompt"]]
    if isinstance(model_input, dict):
        value = model_input.get("prompt")
        return [value] if isinstance(value, str) else [str(p) for p in value or []]
    if isinstance(model_input, str):
        return [model_input]
    return [str(p) for p in model_input]


mlflow.models.set_model(EditedModel())
