"""Shared fixtures: tiny random models (built in memory, a few milliseconds each, no download).

Each test gets its own fresh model, so a test that fails half-way through an attach cannot leave
an edited model behind for the next one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from editing_core.data import EditRequest
from editing_core.models.tiny import tiny_model


@pytest.fixture
def llama():
    """A fresh 2-layer tiny Llama (seed 0) with the word-level tiny tokenizer."""
    return tiny_model("llama", seed=0)


@pytest.fixture
def gpt2():
    """A fresh 2-layer tiny GPT-2 (Conv1D weights), seed 0."""
    return tiny_model("gpt2", seed=0)


@pytest.fixture
def facts() -> list[EditRequest]:
    """Three facts over the tiny tokenizer's words, with rephrases and locality pairs."""
    return [
        EditRequest("The capital of France is", "Rome", rephrase=("France capital city is",),
                    locality_prompt="Alice plays", locality_answer="chess"),
        EditRequest("Bob works for", "Sega Nokia", rephrase=("Bob is born in",),
                    locality_prompt="The river of Egypt is", locality_answer="Cairo"),
        EditRequest("The language of Japan is", "German",
                    locality_prompt="Carol plays the", locality_answer="piano"),
    ]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the full state_dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """True when every state_dict entry equals `state` bit for bit (same keys, dtypes, values)."""
    current = model.state_dict()
    return current.keys() == state.keys() and all(
        current[k].dtype == state[k].dtype and torch.equal(current[k], state[k]) for k in state
    )


CITIES = "Paris Rome London Berlin Madrid Tokyo Lisbon Vienna Oslo Cairo".split()  # all in the tiny vocabulary


def _write_copy_task(directory: Path, examples: int = 5) -> Path:
    """A k-shot task file `copy.jsonl` in `directory` ("Repeat the word ." over city names,
    `examples` examples per row); returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": "Repeat the word .",
             "examples": [{"input": w, "answer": w} for w in CITIES if w != query][:examples], "query": query, "answer": query}
            for query in CITIES]
    (directory / "copy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return directory


@pytest.fixture
def copy_task() -> Callable[..., Path]:
    """`copy_task(directory, examples=5)` writes a tiny-vocabulary task file (see _write_copy_task)."""
    return _write_copy_task


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama (seed 0) saved as a local model directory (for the CLI and Ray workers)."""
    loaded = tiny_model("llama", seed=0)
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return str(path)
