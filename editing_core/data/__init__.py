"""Facts: the `EditRequest` type and the loaders that read and validate facts files.

Importing this package reads nothing; see `loaders` for the formats understood.
"""

from editing_core.data.loaders import (
    SUPPORTED_EXTENSIONS,
    FactProblem,
    FactsValidationError,
    check_prompt_lengths,
    detect_format,
    load_facts,
    load_facts_with_format,
    requests_from_dataset,
    summarize_facts,
)
from editing_core.data.requests import EditRequest

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "EditRequest",
    "FactProblem",
    "FactsValidationError",
    "check_prompt_lengths",
    "detect_format",
    "load_facts",
    "load_facts_with_format",
    "requests_from_dataset",
    "summarize_facts",
]
