"""The pipeline spec: a YAML file, loaded strictly into frozen dataclasses.

    name: demo                    # run name; also the MLflow experiment unless tracking.experiment is set
    model: smollm2-135m           # alias, local directory, .gguf file or hub id
    facts: demo_facts.jsonl       # a facts file, or a directory of them; relative paths are
                                  # relative to the YAML file's directory
    heldout: null                 # optional facts file of (prompt, target_new) pairs the model
                                  # should keep getting right (drawdown); target_new is the true answer
    steps:
      - validate: {}              # always first: prompts must fit the model's context
      - edit:                     # optional
          method: ft_kl
          config: {layers: [4, 5, 6], steps: 20}   # the method's own config, checked strictly
          stream_every: 0         # N > 0: edit one request at a time, log retention every N edits
      - evaluate: {generated: true, batch_size: 16}  # optional; an EvalConfig
    tracking:
      experiment: editflow
    resources:
      cpus: 2                     # CPUs the model worker asks Ray for; torch uses that many threads
    registry:                     # optional; how a run that edits is versioned (infra.registry)
      name: smollm2-135m-edits    # registered model (default: <model>-edits)
      build_on_champion: true     # edit on top of the current champion's lineage
      promote: true               # move `champion` when the gates pass
      gates: {edit_success: 0.9, locality: 0.9, drawdown: 0.05}

`load_pipeline` checks everything that can be checked without a model before any Ray call:
YAML syntax, unknown keys, step kinds and order, the method and its config, the facts and
heldout files. Config errors name the YAML file and the field path
(`pipeline.yaml: steps[1].edit.config.lr: expected a number, got 'fast'`); a facts file with bad
rows raises the loader's FactsValidationError, which names the facts file, row and field.

An evaluate step without an edit step scores the unedited model (a baseline run).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from editing_core.config import ConfigError, config_to_dict, load_config, yaml_load
from editing_core.data import EditRequest, load_facts
from editing_core.evaluate import EvalConfig
from infra.registry import RegistrySpec

log = logging.getLogger(__name__)

STEP_KINDS = ("validate", "edit", "evaluate")  # also their required order


@dataclass(frozen=True)
class ValidateStep:
    """Check the facts against the loaded model: every prompt, with its answer appended, must fit
    the model's context. (The facts file itself is validated when the spec is loaded.)"""


@dataclass(frozen=True)
class EditorTrainSpec:
    """`train:` of a mend / salem edit step: train the editor network first (Ray Train +
    DeepSpeed; see pipelines/editor_training.py), then edit with it. method salem picks the
    edited layer by saliency over the first `saliency_rows` training facts.

    facts:         training facts (each with a locality prompt); val: validation facts.
    out:           directory of the training run; the editor lands in out/editor. A pipeline
                   run whose out already holds an editor trained for `train.steps` steps reuses
                   it; one with fewer steps resumes the training from its last checkpoint.
    net / train:   MendNetConfig / MendTrainConfig fields (editing_core/editors/mend.py), strict.
    workers, cpus_per_worker, zero_stage, offload: as tasks.mend_train.DistributedConfig.
    saliency_rows: facts scored to choose the salient layer (salem).
    salient_by:    salem: `gradient` (layer saliency, the paper) or `edit_gain` (the layer whose
                   calibrated plain low-rank step lowers the training loss most).
    salient_layers: salem: the candidate layers (empty: all).
    max_rows:      train on at most this many facts (None: all).
    Paths are relative to the pipeline file's directory.
    """

    facts: str
    out: str
    val: str | None = None
    net: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    workers: int = 2
    cpus_per_worker: int = 1
    zero_stage: int = 2
    offload: bool = False
    saliency_rows: int = 20
    salient_by: str = "gradient"
    salient_layers: tuple[int, ...] = ()
    max_rows: int | None = None


@dataclass(frozen=True)
class EditStep:
    """Edit the model with `method`; `config` is the method's config as plain data.

    After `load_pipeline`, `config` is the method's complete config (defaults filled in),
    already validated against `EDITORS[method].config_class`.

    stream_every: 0 edits all requests at once. N > 0 applies them one at a time (lifelong
    editing, e.g. GRACE) and every N edits logs edit / test retention, paraphrase accuracy,
    codebook size and seconds per edit as MLflow curves (stream_*), with stream.json and
    stream.png; test retention uses the heldout pairs, else the requests' locality pairs.

    train: mend / salem only: train the editor before editing (see EditorTrainSpec); the
    config's `editor` is then the trained one. Without it, `config.editor` names a trained editor.
    """

    method: str
    config: dict[str, Any] = field(default_factory=dict)
    stream_every: int = 0
    train: EditorTrainSpec | None = None


@dataclass(frozen=True)
class TrackingSpec:
    """experiment: the MLflow experiment (default: the pipeline's name)."""

    experiment: str | None = None


@dataclass(frozen=True)
class ResourcesSpec:
    """cpus: CPUs the model worker reserves in Ray; torch runs that many threads (at least 1)."""

    cpus: float = 2.0

    def __post_init__(self) -> None:
        if self.cpus <= 0:
            raise ValueError(f"cpus must be > 0, got {self.cpus}")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


@dataclass(frozen=True)
class PipelineFile:
    """The YAML document exactly as written (paths unresolved, steps as raw mappings)."""

    name: str
    model: str
    facts: str
    steps: tuple[Any, ...]
    kind: str = "edit"
    heldout: str | None = None
    tracking: TrackingSpec = TrackingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    registry: RegistrySpec = RegistrySpec()


@dataclass(frozen=True)
class PipelineSpec:
    """A validated pipeline: absolute paths, typed steps.

    steps:    the step kinds in order, e.g. ("validate", "edit", "evaluate").
    edit:     the edit step, or None; evaluate: the evaluation config, or None.
    source:   the YAML file the spec came from.
    """

    name: str
    model: str
    facts: Path
    heldout: Path | None
    steps: tuple[str, ...]
    edit: EditStep | None
    evaluate: EvalConfig | None
    tracking: TrackingSpec
    resources: ResourcesSpec
    source: Path
    registry: RegistrySpec = RegistrySpec()

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def editor_config(self) -> Any:
        """The edit step's config as the method's frozen dataclass (None without an edit step)."""
        if self.edit is None:
            return None
        from editing_core.editors import EDITORS

        return load_config(EDITORS[self.edit.method].config_class, self.edit.config)


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------


def load_pipeline(path: str | os.PathLike[str]) -> PipelineSpec:
    """Read and validate a pipeline YAML file; nothing is started, nothing is written.

    Raises ConfigError (naming the file and the field path) or FactsValidationError (naming the
    facts file, row and field).
    """
    source = Path(path)
    where = str(path)
    document = _read_yaml(source, where)
    if document.get("kind", "edit") != "edit":
        raise ConfigError(f"{where}: kind: {document['kind']!r}: this needs an edit pipeline (kind: edit); "
                          "`editflow run` also runs kind: prune")
    raw = _load_section(PipelineFile, document, where, "")
    _check_text_field(raw.name, where, "name")
    _check_text_field(raw.model, where, "model")
    kinds, edit, evaluate = _parse_steps(raw.steps, where)
    base = source.resolve().parent
    if edit is not None:
        edit = _resolve_editor_paths(edit, base, where, f"steps[{kinds.index('edit')}].edit")
    facts = _existing_file(raw.facts, base, where, "facts", directory_ok=True)
    heldout = _existing_file(raw.heldout, base, where, "heldout") if raw.heldout is not None else None
    if raw.registry.name is not None:
        _check_text_field(raw.registry.name, where, "registry.name")
        if any(c in raw.registry.name for c in "/:"):
            raise ConfigError(f"{where}: registry.name: {raw.registry.name!r}: MLflow model names cannot contain '/' or ':'")
    if heldout is not None and evaluate is None:
        raise ConfigError(f"{where}: heldout: only the evaluate step uses it, and the pipeline has none")
    _check_facts(facts)
    if heldout is not None:
        _check_facts(heldout)
    return PipelineSpec(
        name=raw.name, model=raw.model, facts=facts, heldout=heldout, steps=kinds, edit=edit,
        evaluate=evaluate, tracking=raw.tracking, resources=raw.resources, source=source.resolve(),
        registry=raw.registry,
    )


def load_any_pipeline(path: str | os.PathLike[str]) -> Any:
    """An edit pipeline (`PipelineSpec`) or, for `kind: prune`, a `pipelines.prune.PruneSpec`."""
    document = _read_yaml(Path(path), str(path))
    if document.get("kind", "edit") == "prune":
        from pipelines.prune import load_prune_pipeline

        return load_prune_pipeline(path, document)
    return load_pipeline(path)


def _read_yaml(path: Path, where: str) -> Mapping[str, Any]:
    """The YAML document of `path` as a mapping; syntax errors name the line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: pipeline file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read the pipeline file: {exc}") from None
    try:
        document = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {place}{problem}") from None
    if not isinstance(document, Mapping):
        got = "an empty file" if document is None else f"a {type(document).__name__}"
        raise ConfigError(f"{where}: the top level must be a mapping (name, model, facts, steps, ...), got {got}")
    return document


def _load_section(cls: type, data: Any, where: str, path: str) -> Any:
    """`load_config(cls, data)` with errors re-anchored at `path` inside the file `where`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {path}: expected a mapping, got {data!r}")
    try:
        return load_config(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {_anchor(str(exc), cls, path)}") from None


_FIELD_PREFIX = re.compile(r"^(?P<field>[A-Za-z_][\w.\[\]]*): (?P<rest>.*)$", re.DOTALL)


def _anchor(message: str, cls: type, path: str) -> str:
    """Re-anchor a load_config message at `path`.

    A message about a field ("lr: expected ...") gets the section's path prepended
    ("steps[1].edit.config.lr: ..."); a message about the whole section (": unknown key(s) ...",
    "FTConfig: ...", or one with no prefix at all) is placed at the section's path itself.
    """
    match = _FIELD_PREFIX.match(message)
    if match is None or match["field"] == cls.__name__:
        rest = message.removeprefix(": ") if match is None else match["rest"]
        return f"{path}: {rest}" if path else rest
    return f"{path}.{message}" if path else message


def _check_text_field(value: str, where: str, path: str) -> None:
    if not value.strip():
        raise ConfigError(f"{where}: {path}: must not be empty")


def _parse_steps(steps: tuple[Any, ...], where: str) -> tuple[tuple[str, ...], EditStep | None, EvalConfig | None]:
    """Check kinds, order and each step's own config; returns (kinds, edit step, eval config)."""
    if not steps:
        raise ConfigError(f"{where}: steps: needs at least `- validate: {{}}`")
    kinds: list[str] = []
    edit: EditStep | None = None
    evaluate: EvalConfig | None = None
    for index, entry in enumerate(steps):
        kind, body = _step_entry(entry, where, index)
        _check_order(kind, kinds, where, index)
        kinds.append(kind)
        path = f"steps[{index}].{kind}"
        if kind == "validate":
            _load_section(ValidateStep, body, where, path)
        elif kind == "edit":
            edit = _parse_edit(body, where, path)
        else:
            evaluate = _load_section(EvalConfig, body, where, path)
    return tuple(kinds), edit, evaluate


def _step_entry(entry: Any, where: str, index: int) -> tuple[str, Any]:
    """(kind, body) of one `- kind: {...}` entry; a bare `- kind` or a null body means {}."""
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: steps[{index}]: expected a step such as `- validate: {{}}`, got {entry!r}")
    keys = list(entry)
    if len(keys) != 1:
        raise ConfigError(
            f"{where}: steps[{index}]: a step is a mapping with exactly one key "
            f"({', '.join(STEP_KINDS)}), got {keys}"
        )
    kind = keys[0]
    if kind not in STEP_KINDS:
        raise ConfigError(f"{where}: steps[{index}]: unknown step {kind!r}; steps are {', '.join(STEP_KINDS)}")
    body = entry[kind]
    return kind, ({} if body is None else body)


def _check_order(kind: str, seen: list[str], where: str, index: int) -> None:
    """validate first; then edit and/or evaluate, each at most once, in that order."""
    if index == 0 and kind != "validate":
        raise ConfigError(f"{where}: steps[0]: the first step must be `validate`, got {kind!r}")
    if kind in seen:
        raise ConfigError(f"{where}: steps[{index}].{kind}: this step appears more than once")
    later = [k for k in seen if STEP_KINDS.index(k) > STEP_KINDS.index(kind)]
    if later:
        raise ConfigError(
            f"{where}: steps[{index}].{kind}: must come before {later[0]} (order: {', '.join(STEP_KINDS)})"
        )


def _parse_edit(body: Any, where: str, path: str) -> EditStep:
    """The edit step with its method config validated and completed with the defaults."""
    from editing_core.editors import EDITORS, Editor, editor_names

    step = _load_section(EditStep, body, where, path)
    if step.method not in EDITORS:
        raise ConfigError(
            f"{where}: {path}.method: unknown editing method {step.method!r}; available: {', '.join(editor_names())}"
        )
    if step.stream_every < 0:
        raise ConfigError(f"{where}: {path}.stream_every: must be >= 0 (0: edit all requests at once)")
    if step.stream_every and EDITORS[step.method].sequential is Editor.sequential:
        raise ConfigError(f"{where}: {path}.stream_every: method {step.method!r} has no sequential mode")
    config_class = EDITORS[step.method].config_class
    config = _load_section(config_class, step.config, where, f"{path}.config")
    return dataclasses.replace(step, config=config_to_dict(config))


def _resolve_editor_paths(step: EditStep, base: Path, where: str, path: str) -> EditStep:
    """mend / salem: the editor directory and the training files relative to the YAML file; the
    training's net and train configs checked strictly; `config.editor` set to what the training
    writes. Other methods: `train` is refused."""
    if "editor" not in step.config:
        if step.train is not None:
            raise ConfigError(f"{where}: {path}.train: method {step.method!r} trains no editor (mend and salem do)")
        return step
    config = dict(step.config)
    if step.train is None:
        if not config["editor"]:
            raise ConfigError(f"{where}: {path}.config.editor: {step.method} needs a trained editor directory, or a `train:` section")
        config["editor"] = str((base / Path(config["editor"]).expanduser()).resolve())
        if not Path(config["editor"]).is_dir():
            raise ConfigError(f"{where}: {path}.config.editor: {config['editor']} is not a directory")
        return dataclasses.replace(step, config=config)
    from editing_core.editors.mend import MendNetConfig, MendTrainConfig

    train = step.train
    if config["editor"]:
        raise ConfigError(f"{where}: {path}: give either config.editor (a trained editor) or train (train one), not both")
    _load_section(MendNetConfig, train.net, where, f"{path}.train.net")
    _load_section(MendTrainConfig, train.train, where, f"{path}.train.train")
    from editing_core.editors.salem import LAYER_CRITERIA

    if train.salient_by not in LAYER_CRITERIA:
        raise ConfigError(f"{where}: {path}.train.salient_by: must be one of {list(LAYER_CRITERIA)}, got {train.salient_by!r}")
    out = (base / Path(train.out).expanduser()).resolve()
    facts = _existing_file(train.facts, base, where, f"{path}.train.facts")
    load_facts(facts, allow_conflicts=True)  # bad training rows fail here, naming file, row and field
    resolved = dataclasses.replace(
        train, facts=str(facts), out=str(out),
        val=str(_existing_file(train.val, base, where, f"{path}.train.val")) if train.val else None)
    config["editor"] = str(out / "editor")
    return dataclasses.replace(step, config=config, train=resolved)


def _existing_file(value: str, base: Path, where: str, path: str, directory_ok: bool = False) -> Path:
    """`value` resolved against the YAML's directory; it must be an existing file (or, with
    `directory_ok`, directory)."""
    if not value.strip():
        raise ConfigError(f"{where}: {path}: must not be empty")
    resolved = (base / Path(value).expanduser()).resolve()
    if directory_ok and resolved.is_dir():
        return resolved
    if not resolved.is_file():
        reason = "is a directory, not a file" if resolved.is_dir() else "file not found"
        raise ConfigError(
            f"{where}: {path}: {value!r} {reason} (looked for {resolved}; relative paths are "
            "relative to the pipeline file's directory)"
        )
    return resolved


def _check_facts(path: Path) -> list[EditRequest]:
    """Validate a facts file with the shared loader (FactsValidationError propagates)."""
    return load_facts(path)
