"""Read facts files (and `datasets.Dataset`s) into validated `EditRequest`s.

Every problem a facts file has is found before any model is loaded, and all of them are
reported at once: each names the file, the 1-based line (JSON lines, CSV) or record (JSON
array, parquet, datasets) and the field, so the user can fix the file in one pass.

Three row formats are understood, told apart by their fields (see `detect_format`):

- generic:     prompt, target_new [, subject, ground_truth, rephrase, locality_prompt,
               locality_answer]; as JSON lines, a JSON array, CSV or parquet.
- counterfact: EasyEdit's CounterFact JSON (prompt, target_new, rephrase_prompt,
               locality_prompt, locality_ground_truth, ...).
- zsre:        MEND's zsRE JSON (src, alt, rephrase, loc, loc_ans, answers, ...).

Text files are parsed here, line by line from bytes, so that a line that is not UTF-8 or not
JSON can be named. Nothing happens at import time; pyarrow is imported only to read parquet.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editing_core.data.requests import EditRequest

if TYPE_CHECKING:  # pragma: no cover - typing only; datasets is heavy to import
    import datasets

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


# --------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class FactProblem:
    """One thing wrong with a facts source, located as precisely as the format allows.

    file:     the file (as the caller named it) or dataset origin.
    location: "line 3" / "record 2", or None when the problem concerns the whole file.
    field:    the field as named in the file ("target_new", "alt"), or None.
    message:  what is wrong, in words.
    """

    file: str
    location: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        head = self.file if self.location is None else f"{self.file} {self.location}"
        if self.field is not None:
            head += f", field {self.field!r}"
        return f"{head}: {self.message}"


class FactsValidationError(ValueError):
    """Facts that cannot be used; `problems` holds every problem found, `str()` one per line."""

    def __init__(self, problems: Sequence[FactProblem]) -> None:
        self.problems: list[FactProblem] = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the problems when pickled (e.g. sent back from a worker process).
        return (self.__class__, (self.problems,))


# --------------------------------------------------------------------------------------------
# Formats: which field of a row becomes which field of the request


@dataclass(frozen=True)
class _FieldSpec:
    """How one field of a row maps onto an `EditRequest` attribute.

    kind: "text" (a string), "first" (a string, or a list of strings of which the first is
    used) or "texts" (a string or a list of strings, kept as a tuple).
    """

    key: str
    attr: str
    kind: str = "text"
    required: bool = False


_FORMATS: dict[str, tuple[_FieldSpec, ...]] = {
    "generic": (
        _FieldSpec("prompt", "prompt", required=True),
        _FieldSpec("target_new", "target_new", required=True),
        _FieldSpec("subject", "subject"),
        _FieldSpec("ground_truth", "ground_truth"),
        _FieldSpec("rephrase", "rephrase", "texts"),
        _FieldSpec("locality_prompt", "locality_prompt"),
        _FieldSpec("locality_answer", "locality_answer"),
    ),
    "counterfact": (
        _FieldSpec("prompt", "prompt", required=True),
        _FieldSpec("target_new", "target_new", required=True),
        _FieldSpec("subject", "subject"),
        _FieldSpec("ground_truth", "ground_truth", "first"),
        _FieldSpec("rephrase_prompt", "rephrase", "texts"),
        _FieldSpec("locality_prompt", "locality_prompt"),
        _FieldSpec("locality_ground_truth", "locality_answer", "first"),
    ),
    "zsre": (
        _FieldSpec("src", "prompt", required=True),
        _FieldSpec("alt", "target_new", required=True),
        _FieldSpec("subject", "subject"),
        _FieldSpec("answers", "ground_truth", "first"),
        _FieldSpec("rephrase", "rephrase", "texts"),
        _FieldSpec("loc", "locality_prompt"),
        _FieldSpec("loc_ans", "locality_answer"),
    ),
}

# Fields these formats are known to carry that the requests do not use (not worth a warning).
_KNOWN_UNUSED: dict[str, frozenset[str]] = {
    "generic": frozenset({"case_id", "id"}),
    "counterfact": frozenset({"case_id"}),
    "zsre": frozenset({"pred", "cond", "case_id", "id"}),
}

_EXPECTED_FIELDS = (
    "expected 'prompt' and 'target_new' (generic facts, or CounterFact with 'rephrase_prompt' / "
    "'locality_ground_truth' / 'case_id'), or 'src' and 'alt' (zsRE)"
)


def detect_format(row: Mapping[str, Any]) -> str:
    """Tell the format of a facts row from its field names: "counterfact", "zsre" or "generic".

    src (+ alt) -> zsre; prompt/target_new with rephrase_prompt or locality_ground_truth ->
    counterfact; prompt/target_new with case_id and no generic-only field (rephrase,
    locality_answer) -> counterfact; prompt/target_new otherwise -> generic.
    Raises ValueError, naming the expected fields, when none applies.
    """
    keys = set(row)
    if "src" in keys and "prompt" not in keys:
        return "zsre"
    if keys & {"prompt", "target_new"}:
        if keys & {"rephrase_prompt", "locality_ground_truth"}:
            return "counterfact"
        if "case_id" in keys and not keys & {"rephrase", "locality_answer"}:
            return "counterfact"
        return "generic"
    raise ValueError(f"cannot tell the facts format from fields {sorted(keys)}: {_EXPECTED_FIELDS}")


# --------------------------------------------------------------------------------------------
# Raw rows: what a reader hands to the validator


@dataclass
class _RawRows:
    """Rows of one source before validation, each with its location, plus problems so far.

    columns is set for tabular sources (CSV, parquet, datasets): their fields are known once.
    """

    file: str
    rows: list[tuple[str, Any]] = field(default_factory=list)
    problems: list[FactProblem] = field(default_factory=list)
    columns: list[str] | None = None

    def problem(self, location: str | None, field_name: str | None, message: str) -> None:
        self.problems.append(FactProblem(self.file, location, field_name, message))


def _split_lines(data: bytes, raw: _RawRows) -> tuple[list[str], set[int]]:
    """Decode bytes line by line (1-based line i is item i-1); returns the lines and the
    numbers of lines that are not UTF-8, each also recorded as a problem.

    A bad line is kept, decoded with replacement characters, so later lines keep their
    numbers. Line endings are dropped; a leading BOM is removed.
    """
    lines: list[str] = []
    bad: set[int] = set()
    for number, chunk in enumerate(data.split(b"\n"), start=1):
        chunk = chunk[:-1] if chunk.endswith(b"\r") else chunk
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as err:
            message = f"not valid UTF-8 (bad byte {err.start + 1} of the line)"
            raw.problem(f"line {number}", None, message)
            lines.append(chunk.decode("utf-8", errors="replace"))
            bad.add(number)
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return lines, bad


def _read_jsonl(path: Path, name: str) -> _RawRows:
    """One JSON value per line; blank lines are skipped, bad lines reported by number."""
    raw = _RawRows(name)
    lines, bad = _split_lines(path.read_bytes(), raw)
    for number, line in enumerate(lines, start=1):
        if number in bad or not line.strip():
            continue
        try:
            raw.rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raw.problem(f"line {number}", None, f"not valid JSON: {err.msg} (column {err.colno})")
    return raw


def _read_json_array(path: Path, name: str) -> _RawRows:
    """A JSON array of objects; rows are numbered as records (1-based)."""
    raw = _RawRows(name)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _split_lines(data, raw)  # names every line that is not UTF-8
        return raw
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return raw
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (one object per line? name the file .jsonl)" if err.msg == "Extra data" else ""
        message = f"not valid JSON: {err.msg} (column {err.colno}){hint}"
        raw.problem(f"line {err.lineno}", None, message)
        return raw
    if not isinstance(value, list):
        raw.problem(None, None, f"expected a JSON array of objects, got a JSON {_json_type(value)}"
                    " (for one object per line, name the file .jsonl)")
        return raw
    raw.rows = [(f"record {i}", row) for i, row in enumerate(value, start=1)]
    return raw


def _read_csv(path: Path, name: str) -> _RawRows:
    """CSV with a header row (line 1); a data row is located by the line it starts on."""
    raw = _RawRows(name)
    lines, bad_lines = _split_lines(path.read_bytes(), raw)
    reader = csv.reader(line + "\n" for line in lines)
    end = 0
    try:
        for cells in reader:
            start, end = end + 1, reader.line_num
            if bad_lines.intersection(range(start, end + 1)):
                continue
            _add_csv_row(raw, start, cells)
    except csv.Error as err:
        raw.problem(f"line {reader.line_num}", None, f"not valid CSV: {err}")
    return raw


def _add_csv_row(raw: _RawRows, line: int, cells: list[str]) -> None:
    """Take the first non-blank row as the header, later ones as data rows keyed by it."""
    if not any(cell.strip() for cell in cells):
        return
    if raw.columns is None:
        raw.columns = [cell.strip() for cell in cells]
        return
    if len(cells) != len(raw.columns):
        raw.problem(f"line {line}", None,
                    f"row has {len(cells)} values but the header has {len(raw.columns)} columns")
        return
    raw.rows.append((f"line {line}", dict(zip(raw.columns, cells))))


def _read_parquet(path: Path, name: str) -> _RawRows:
    """A parquet table, one request per row; rows are numbered as records (1-based)."""
    import pyarrow
    import pyarrow.parquet

    raw = _RawRows(name)
    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raw.problem(None, None, f"not a readable parquet file: {err}")
        return raw
    raw.columns = list(table.column_names)
    raw.rows = [(f"record {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]
    return raw


_READERS = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json_array,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


# --------------------------------------------------------------------------------------------
# Validation: raw rows -> requests


def _json_type(value: Any) -> str:
    """A value's type in words a facts-file author knows ("number", "list", "object")."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _check_text(value: Any, what: str = "value") -> str | None:
    """Why `value` is not a usable non-blank string, or None when it is."""
    if not isinstance(value, str):
        return f"expected a string, got a {_json_type(value)} ({value!r:.60})"
    if not value:
        return f"empty {what}"
    if not value.strip():
        return f"blank {what} (only whitespace)"
    return None


def _convert_list(value: Any) -> tuple[tuple[str, ...], str | None]:
    """A string or list of strings as a tuple of non-blank strings, or the reason it is not."""
    if isinstance(value, str):
        return (value,), _check_text(value)
    if not isinstance(value, (list, tuple)):
        return (), f"expected a string or a list of strings, got a {_json_type(value)}"
    for index, item in enumerate(value, start=1):
        reason = _check_text(item, "item")
        if reason is not None:
            return (), f"item {index} of the list: {reason}"
    return tuple(value), None


def _convert_value(value: Any, spec: _FieldSpec) -> tuple[Any, str | None]:
    """Convert one present field; returns (value for the request, problem message or None).

    A null, or an empty string in an optional field, counts as absent (CSV cannot say null).
    """
    if value is None or (value == "" and not spec.required):
        return ((), None) if spec.kind == "texts" else (None, None)
    if spec.kind == "text":
        return value, _check_text(value)
    texts, reason = _convert_list(value)
    if spec.kind == "texts" or reason is not None:
        return texts, reason
    return (texts[0] if texts else None), None


def _request_from_row(
    row: Mapping[str, Any], specs: Sequence[_FieldSpec], file: str, location: str
) -> tuple[EditRequest | None, list[FactProblem]]:
    """Validate one mapping row against a format; the request is None when anything is wrong."""
    values: dict[str, Any] = {}
    problems: list[FactProblem] = []
    for spec in specs:
        if spec.key not in row:
            if spec.required:
                problems.append(FactProblem(file, location, spec.key, "missing field"))
            continue
        if spec.required and row[spec.key] is None:
            problems.append(FactProblem(file, location, spec.key, "missing value (null)"))
            continue
        value, reason = _convert_value(row[spec.key], spec)
        if reason is not None:
            problems.append(FactProblem(file, location, spec.key, reason))
        values[spec.attr] = value
    if problems:
        return None, problems
    return EditRequest(**values, source=f"{file} {location}"), []


def _conflict(
    request: EditRequest, location: str, seen: dict[str, tuple[str, str]], target_key: str,
    file: str,
) -> FactProblem | None:
    """A problem when an earlier row gave the same prompt a different target; records firsts."""
    first = seen.setdefault(request.prompt, (location, request.target_new))
    if first[1] == request.target_new:
        return None
    message = (f"prompt already given at {first[0]} with {target_key} {first[1]!r}, "
               f"here {request.target_new!r}")
    return FactProblem(file, location, target_key, message)


def _detect(raw: _RawRows, mappings: list[Mapping[str, Any]]) -> str | None:
    """The format of a source, from its columns or its first mapping row; None if unknown.

    Records a whole-file problem when the format cannot be told or there is nothing to read.
    """
    if raw.columns is not None and mappings:
        first: Mapping[str, Any] | None = dict.fromkeys(raw.columns)
    else:
        first = mappings[0] if mappings else None
    if first is None:
        if not raw.problems:
            raw.problem(None, None, "empty: no facts found")
        return None
    try:
        fmt = detect_format(first)
    except ValueError as err:
        raw.problem(None, None, str(err))
        return None
    _log_unused_fields(raw.file, fmt, first)
    return fmt


def _log_unused_fields(file: str, fmt: str, row: Mapping[str, Any]) -> None:
    """Warn about fields the format does not know: often a typo ("rephrases")."""
    used = {spec.key for spec in _FORMATS[fmt]} | _KNOWN_UNUSED[fmt]
    unknown = sorted(str(key) for key in row if key not in used)
    if unknown:
        logger.warning("%s: ignoring fields not used by the %s format: %s", file, fmt, unknown)


def _missing_columns(raw: _RawRows, specs: Sequence[_FieldSpec]) -> bool:
    """For tabular sources, report required columns absent from the header, once each."""
    if raw.columns is None:
        return False
    missing = [spec.key for spec in specs if spec.required and spec.key not in raw.columns]
    for key in missing:
        raw.problem(None, key, f"missing column (columns are {raw.columns})")
    return bool(missing)


def _mapping_rows(raw: _RawRows) -> list[tuple[str, Mapping[str, Any]]]:
    """The rows that are objects; every other row is recorded as a problem."""
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for location, row in raw.rows:
        if isinstance(row, Mapping):
            rows.append((location, row))
        else:
            raw.problem(location, None, f"expected an object with fields, got a {_json_type(row)}")
    return rows


def _in_file_order(problems: list[FactProblem]) -> list[FactProblem]:
    """Whole-file problems first, then by line or record number (stable within a row)."""

    def key(problem: FactProblem) -> tuple[int, int]:
        if problem.location is None:
            return (0, 0)
        return (1, int(problem.location.rsplit(" ", 1)[1]))

    return sorted(problems, key=key)


def _validate(raw: _RawRows, allow_conflicts: bool = False) -> tuple[str, list[EditRequest]]:
    """Turn raw rows into requests, or raise FactsValidationError with every problem found."""
    rows = _mapping_rows(raw)
    fmt = _detect(raw, [row for _, row in rows])
    if fmt is None or _missing_columns(raw, _FORMATS[fmt]):
        raise FactsValidationError(_in_file_order(raw.problems))
    specs = _FORMATS[fmt]
    target_key = next(spec.key for spec in specs if spec.attr == "target_new")
    requests: list[EditRequest] = []
    seen: dict[str, tuple[str, str]] = {}
    for location, row in rows:
        request, problems = _request_from_row(row, specs, raw.file, location)
        raw.problems.extend(problems)
        if request is None:
            continue
        conflict = None if allow_conflicts else _conflict(request, location, seen, target_key, raw.file)
        if conflict is not None:
            raw.problems.append(conflict)
        requests.append(request)
    if raw.problems:
        raise FactsValidationError(_in_file_order(raw.problems))
    return fmt, requests


# --------------------------------------------------------------------------------------------
# Public entry points


def load_facts_with_format(path: str | os.PathLike[str], allow_conflicts: bool = False) -> tuple[str, list[EditRequest]]:
    """Load and validate a facts file; returns its format ("generic", ...) and the requests.
    `allow_conflicts`: see `load_facts`.

    Raises FactsValidationError listing every problem (missing file, unsupported extension,
    bad rows, conflicting targets), each with its line or record and field.
    """
    name = os.fspath(path)
    file = Path(name)
    if not file.is_file():
        reason = "is a directory, not a file" if file.is_dir() else "file not found"
        raise FactsValidationError([FactProblem(name, None, None, reason)])
    reader = _READERS.get(file.suffix.lower())
    if reader is None:
        extension = repr(file.suffix) if file.suffix else "(none)"
        message = (f"unsupported file extension {extension}; supported: "
                   f"{', '.join(SUPPORTED_EXTENSIONS)}")
        raise FactsValidationError([FactProblem(name, None, None, message)])
    fmt, requests = _validate(reader(file, name), allow_conflicts)
    logger.info("loaded %d edit requests (%s format) from %s", len(requests), fmt, name)
    return fmt, requests


def load_facts(path: str | os.PathLike[str], allow_conflicts: bool = False) -> list[EditRequest]:
    """Load and validate a facts file (JSONL, JSON array, CSV or parquet; generic, CounterFact
    or zsRE rows); each request's `source` says where it came from ("facts.jsonl line 3").

    A directory saved by `datasets.Dataset.save_to_disk` is read as that dataset. Any other
    directory stands for every facts file in it (by extension, in name order, not recursive):
    a fact repeated in a later file is kept once, and a prompt given different targets in two
    files is an error naming both places.

    `allow_conflicts`: a prompt may carry different targets in different rows. An edit batch
    must not (the model cannot learn both), but a training set for an editor network may: each
    row is a separate training edit (CounterFact train has 74 such prompts).

    Raises FactsValidationError listing every problem at once.
    """
    if not Path(path).is_dir():
        return load_facts_with_format(path, allow_conflicts)[1]
    if any((Path(path) / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        return _load_saved_dataset(Path(path))
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
    if not files:
        message = f"no facts files ({', '.join(SUPPORTED_EXTENSIONS)}) in this directory"
        raise FactsValidationError([FactProblem(os.fspath(path), None, None, message)])
    requests: list[EditRequest] = []
    problems: list[FactProblem] = []
    first_seen: dict[str, EditRequest] = {}
    for file in files:
        try:
            loaded = load_facts_with_format(file, allow_conflicts)[1]
        except FactsValidationError as exc:
            problems += exc.problems
            continue
        for request in loaded:
            first = first_seen.setdefault(request.prompt, request)
            if first is request or (allow_conflicts and first.target_new != request.target_new):
                requests.append(request)
            elif first.target_new != request.target_new:
                problems.append(FactProblem(request.source or os.fspath(file), None, "target_new", (
                    f"prompt already given at {first.source} with target_new {first.target_new!r}, here {request.target_new!r}")))
    if problems:
        raise FactsValidationError(problems)
    return requests


def _load_saved_dataset(path: Path) -> list[EditRequest]:
    """A `datasets.Dataset` saved with `save_to_disk` (a directory with state.json; a saved
    DatasetDict, with dataset_dict.json, is refused with the names of its splits)."""
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        raise FactsValidationError([FactProblem(os.fspath(path), None, None, (
            f"a DatasetDict with splits {splits}: name one split's directory (e.g. {path / next(iter(dataset))})"))])
    return requests_from_dataset(dataset, os.fspath(path))


def requests_from_dataset(dataset: "datasets.Dataset", origin: str) -> list[EditRequest]:
    """Validate and convert a `datasets.Dataset` of facts rows (any of the three formats).

    Rows are located as "record N" (1-based) of `origin`; validation is the same as for files.
    """
    raw = _RawRows(origin, columns=list(dataset.column_names))
    raw.rows = [(f"record {i}", row) for i, row in enumerate(dataset.to_list(), start=1)]
    fmt, requests = _validate(raw)
    logger.info("converted %d edit requests (%s format) from %s", len(requests), fmt, origin)
    return requests


def summarize_facts(requests: Sequence[EditRequest]) -> dict[str, int]:
    """Counts for a one-line summary of loaded facts (the format is the caller's to add)."""
    return {
        "n_requests": len(requests),
        "with_rephrase": sum(1 for r in requests if r.rephrase),
        "n_rephrases": sum(len(r.rephrase) for r in requests),
        "with_locality": sum(1 for r in requests if r.locality_prompt is not None),
        "with_subject": sum(1 for r in requests if r.subject is not None),
    }


# --------------------------------------------------------------------------------------------
# Prompt lengths

_SOURCE_RE = re.compile(r"^(?P<file>.*) (?P<location>(?:line|record) \d+)$")


def _problem_place(request: EditRequest, index: int) -> tuple[str, str | None]:
    """(file, location) of a request from its `source`, or its position when it has none."""
    match = _SOURCE_RE.match(request.source or "")
    if match:
        return match["file"], match["location"]
    return (request.source or "requests"), f"request {index}"


def _join(prompt: str, answer: str | None) -> str:
    """The text a prompt and its answer make together (one space between, as editors do)."""
    if not answer:
        return prompt
    if prompt.endswith(" ") or answer.startswith(" "):
        return prompt + answer
    return f"{prompt} {answer}"


def _texts_to_measure(request: EditRequest) -> list[tuple[str, str, str]]:
    """(field, label, text) for each text whose token length must fit: a prompt with its answer."""
    target = request.target_new
    texts = [("prompt", "prompt + target_new", _join(request.prompt, target))]
    texts += [("rephrase", f"rephrase {k} + target_new", _join(text, target))
              for k, text in enumerate(request.rephrase, start=1)]
    if request.locality_prompt is not None:
        joined = _join(request.locality_prompt, request.locality_answer)
        texts.append(("locality_prompt", "locality_prompt + locality_answer", joined))
    return texts


def _length_problem(
    request: EditRequest, index: int, lengths: list[tuple[str, str, int]], max_length: int
) -> FactProblem | None:
    """One problem for a request whose texts are too long, naming the first offending field."""
    too_long = [(name, label, n) for name, label, n in lengths if n > max_length]
    if not too_long:
        return None
    file, location = _problem_place(request, index)
    parts = [f"{label} is {n} tokens" for _, label, n in too_long]
    message = (f"{'; '.join(parts)}: longer than max_length {max_length} "
               "(texts are never truncated: shorten them or raise max_length)")
    return FactProblem(file, location, too_long[0][0], message)


def check_prompt_lengths(requests: Sequence[EditRequest], tokenizer: Any, max_length: int) -> None:
    """Refuse requests whose prompt, paraphrases or locality prompt, with the answer appended,
    are longer than `max_length` tokens (special tokens included); nothing is truncated.

    Raises FactsValidationError with one problem per offending request (located by its source).
    """
    entries = [(i, name, label, text) for i, request in enumerate(requests, start=1)
               for name, label, text in _texts_to_measure(request)]
    if not entries:
        return
    ids = tokenizer([entry[3] for entry in entries], add_special_tokens=True)["input_ids"]
    lengths: dict[int, list[tuple[str, str, int]]] = {}
    for (index, name, label, _), token_ids in zip(entries, ids):
        lengths.setdefault(index, []).append((name, label, len(token_ids)))
    problems = [p for i, request in enumerate(requests, start=1)
                if (p := _length_problem(request, i, lengths[i], max_length)) is not None]
    if problems:
        raise FactsValidationError(problems)


__all__ = [
    "SUPPORTED_EXTENSIONS",
    "FactProblem",
    "FactsValidationError",
    "check_prompt_lengths",
    "detect_format",
    "load_facts",
    "load_facts_with_format",
    "requests_from_dataset",
    "summarize_facts",
]
