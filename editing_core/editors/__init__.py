"""Editing methods, one file each, behind one registry.

    make_editor("ft_kl", "config.yaml", layers=(10, 11)).edit(loaded, requests) -> EditArtifact

To add a method: write `editors/<name>.py` with a frozen config dataclass (every field
documented) and an `Editor` subclass decorated with `@register_editor`, then import it below.
"""

from __future__ import annotations

from typing import Any, Mapping

from . import ft, ft_kl, grace, mend, salem  # noqa: F401  (registers the editors)
from .base import EDITORS, EditOutcome, Editor, SequentialSession, WeightEditConfig, WeightEditor, register_editor


def editor_names() -> list[str]:
    return sorted(EDITORS)


def make_editor(method: str, config: Mapping[str, Any] | str | None = None, **overrides: Any) -> Editor:
    """The editor `method`, configured from a mapping or YAML file plus keyword overrides."""
    if method not in EDITORS:
        raise ValueError(f"unknown editing method {method!r}; available: {', '.join(editor_names())}")
    return EDITORS[method].from_config(config, **overrides)


__all__ = ["EDITORS", "EditOutcome", "Editor", "SequentialSession", "WeightEditConfig", "WeightEditor", "editor_names", "make_editor", "register_editor"]
