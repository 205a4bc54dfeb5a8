"""Model loading and the role adapter (architecture knowledge as data)."""

from .adapter import ModelAdapter
from .architectures import ARCHITECTURES, ROLES, Architecture, UnsupportedModelError, architecture_for
from .loading import ALIASES, LoadedModel, cache_dir, load_model, resolve_model_path

__all__ = [
    "ALIASES", "ARCHITECTURES", "ROLES", "Architecture", "LoadedModel", "ModelAdapter",
    "UnsupportedModelError", "architecture_for", "cache_dir", "load_model", "resolve_model_path",
]
