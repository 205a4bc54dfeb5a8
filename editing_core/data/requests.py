"""The one request type every editor, metric and loader speaks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class EditRequest:
    """One fact to change: after the edit, `prompt` should continue with `target_new`.

    prompt:          the text the model completes, e.g. "The Eiffel Tower is in".
    target_new:      the new completion, e.g. "Rome".
    subject:         the entity the fact is about ("The Eiffel Tower"), used by some editors.
    ground_truth:    the old (true) completion, when known.
    rephrase:        paraphrases of `prompt` that should also yield `target_new` (generality).
    locality_prompt: an unrelated prompt whose prediction must not change (locality).
    locality_answer: the reference completion of `locality_prompt`.
    source:          where the request came from ("facts.jsonl line 3"); not part of its identity.
    """

    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrase: tuple[str, ...] = ()
    locality_prompt: str | None = None
    locality_answer: str | None = None
    source: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able); `source` is dropped: it is not part of the fact."""
        data = asdict(self)
        data.pop("source")
        data["rephrase"] = list(self.rephrase)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditRequest":
        data = dict(data)
        data["rephrase"] = tuple(data.get("rephrase") or ())
        return cls(**data)

    def digest(self) -> str:
        """A stable content hash of the fact (prompt, target and the optional fields)."""
        text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
