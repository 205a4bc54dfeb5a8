"""The `editflow` command line: validate facts, edit, evaluate, run pipelines, run the demo.

    editflow validate FILE
    editflow edit --model M --method ft_kl --facts FILE [--layers 4,5] [--config YAML] [--parent DIR] --out DIR
    editflow eval --model M [--artifact DIR] --facts FILE [--heldout FILE] [--json]
    editflow grace-stream --model M --facts FILE [--n 1000] [--layer L] --out DIR
    editflow train-editor --model M --facts TRAIN [--val VAL] [--layers L|--salient] [--workers N] [--zero-stage 2] [--offload] --out DIR
    editflow importance --model M [--tasks DIR] [--shots 0,1,5] [--workers N] [--address ADDR] --out DIR
    editflow prune --model M --scores DIR --heads 0.5 --ffn 0.2 [--eval DIR] --out DIR
    editflow run PIPELINE.yaml [--address ADDR] [--tracking-uri URI]
    editflow demo [--tracking-uri URI]
    editflow edits list|show|diff|promote|rollback NAME [VERSION ...] [--tracking-uri URI] [--json]
    editflow serve --name NAME [--alias champion] [--host 127.0.0.1] [--port 8000] [--address ADDR]
    editflow submit PIPELINE.yaml [--address http://HEAD:8265] [--tracking-uri URI] [--wait]
    editflow jobs list|status|logs|stop [JOB_ID] [--address http://HEAD:8265] [--json]
    editflow schedule add --name N --cron "0 3 * * *" --pipeline P.yaml [--address ADDR] | list | remove N
    editflow scheduler run [--once] [--poll-s 30]

Errors a user can cause (bad facts, config, artifact, model, missing input files) print a
message on stderr and exit with status 2, without a traceback (`-v` shows it). Everything heavy
(torch, transformers, ray, mlflow) is imported inside the command that needs it, so
`editflow validate` starts fast. Results go to stdout, logs and progress bars to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover - typing only
    from editing_core.artifacts import EditArtifact
    from editing_core.models import LoadedModel
    from pipelines.runner import PipelineResult

log = logging.getLogger("pipelines.cli")

EXIT_OK, EXIT_USER_ERROR = 0, 2
OUR_LOGGERS = ("editing_core", "pipelines", "tasks", "infra")
_HANDLER_MARK = "_editflow_cli_handler"


class UsageError(ValueError):
    """A command-line input that cannot work (reported like the library's input errors)."""


# ---------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="editflow",
        description="Edit facts in language models: validate facts, edit, evaluate, run pipelines.",
        epilog="Run `editflow COMMAND --help` for a command's options. Exit status: 0 ok, 2 bad input.",
    )
    _add_verbosity(parser, on_subcommand=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_validate, _add_edit, _add_eval, _add_stream, _add_saliency, _add_train_editor, _add_importance, _add_prune, _add_run, _add_demo, _add_edits, _add_serve, _add_submit, _add_jobs,
                _add_schedule, _add_scheduler):
        add(commands)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, on_subcommand: bool) -> None:
    """-v / -q, accepted before or after the command (a subcommand's copy must not reset them)."""
    group = parser.add_mutually_exclusive_group()
    count_default: Any = argparse.SUPPRESS if on_subcommand else 0
    flag_default: Any = argparse.SUPPRESS if on_subcommand else False
    group.add_argument("-v", "--verbose", action="count", default=count_default,
                       help="debug logging, and tracebacks of errors")
    group.add_argument("-q", "--quiet", action="store_true", default=flag_default,
                       help="only warnings and errors on stderr")


def _subparser(commands: Any, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_verbosity(sub, on_subcommand=True)
    return sub


def _add_validate(commands: Any) -> None:
    sub = _subparser(
        commands, "validate", "check a facts file and summarise it",
        "Validate a facts file (JSON lines, JSON array, CSV or parquet; generic, CounterFact or\n"
        "zsRE rows) without loading any model. Prints the format and counts; on problems prints\n"
        "every one of them (file, line or record, field) on stderr and exits with status 2.",
    )
    sub.add_argument("file", type=Path, metavar="FILE", help="the facts file")
    sub.set_defaults(handler=_cmd_validate)


def _add_edit(commands: Any) -> None:
    sub = _subparser(
        commands, "edit", "edit a model and save the edit artifact",
        "Compute an edit of MODEL for the facts in FILE and save it as an edit artifact in DIR\n"
        "(artifact.json + artifact.safetensors; the model itself is not saved). The facts and the\n"
        "method config are checked before the model loads, prompt lengths right after.\n\n"
        "example:\n  editflow edit --model smollm2-135m --method ft_kl --facts facts.jsonl --layers 4,5,6 --out edits/v1",
    )
    _add_model(sub)
    sub.add_argument("--method", required=True, help="editing method by registry name, e.g. ft (fine-tuning) or ft_kl (+ KL locality term); an unknown name lists them all")
    _add_facts(sub)
    sub.add_argument("--layers", type=_layers, metavar="L1,L2", help="layers to edit, comma-separated (negative counts from the end); overrides the config")
    sub.add_argument("--config", type=Path, metavar="YAML", help="the method's config as a YAML mapping (strict: unknown keys are errors)")
    sub.add_argument("--editor", type=Path, metavar="DIR", help="mend / salem: the trained editor (written by `editflow train-editor`)")
    sub.add_argument("--parent", type=Path, metavar="DIR", help="compute the edit on top of this previously saved artifact")
    sub.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write the artifact to")
    sub.add_argument("--force", action="store_true", help="overwrite an existing non-empty --out directory")
    sub.set_defaults(handler=_cmd_edit)


def _add_eval(commands: Any) -> None:
    sub = _subparser(
        commands, "eval", "score a model (optionally with an edit artifact) on facts",
        "Score MODEL on the facts in FILE: edit success, paraphrase, locality and drawdown,\n"
        "teacher-forced and generated. With --artifact, before and after attaching the edit;\n"
        "without, the unedited model. An artifact made on other base weights is refused.",
    )
    _add_model(sub)
    sub.add_argument("--artifact", type=Path, metavar="DIR", help="edit artifact directory to evaluate")
    sub.add_argument("--parent", type=Path, metavar="DIR", help="the artifact's parent, attached first (for edits made with --parent)")
    _add_facts(sub)
    sub.add_argument("--heldout", type=Path, metavar="FILE", help="facts file of (prompt, target_new) pairs the model should keep right, for drawdown")
    sub.add_argument("--json", action="store_true", help="print exactly one JSON object (the metrics, plus `rows`) on stdout")
    sub.set_defaults(handler=_cmd_eval)


def _add_stream(commands: Any) -> None:
    sub = _subparser(
        commands, "grace-stream", "lifelong editing: stream edits one at a time, plot retention",
        "Apply the first N facts of FILE one at a time (GRACE codebook by default; any method\n"
        "with a sequential mode via --method) and every --every edits record edit retention (ERR,\n"
        "accuracy on all past edits), test retention (TRR, unchanged predictions on an unrelated\n"
        "set), paraphrase accuracy, codebook size and seconds per edit. Writes DIR/stream.json,\n"
        "DIR/stream.png and the final edit artifact in DIR/artifact.\n\n"
        "example:\n  editflow grace-stream --model smollm2-135m --facts counterfact.json --n 1000 --layer 21 --out streams/g1",
    )
    _add_model(sub)
    _add_facts(sub)
    sub.add_argument("--n", type=int, metavar="N", help="stream the first N facts (default: all)")
    sub.add_argument("--method", default="grace", help="editing method with a sequential mode (default: grace)")
    sub.add_argument("--layer", type=int, metavar="L", help="GRACE: the wrapped layer (negative counts from the end); overrides the config")
    sub.add_argument("--config", type=Path, metavar="YAML", help="the method's config as a YAML mapping (strict)")
    sub.add_argument("--every", type=int, default=50, metavar="K", help="edits between retention checkpoints (default: 50)")
    sub.add_argument("--unrelated", type=Path, metavar="FILE",
                     help="facts file of (prompt, target_new) pairs for TRR (default: the streamed facts' locality prompts with answers)")
    sub.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for stream.json, stream.png and artifact/")
    sub.add_argument("--force", action="store_true", help="write into an existing non-empty --out directory")
    sub.set_defaults(handler=_cmd_stream)


def _add_ray_workers(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--workers", type=int, default=0, metavar="N", help="Ray workers (default: 0, this process)")
    sub.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="CPUs (and torch threads) per Ray worker (default: 1)")
    sub.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: a local cluster)")


def _add_analysis_inputs(sub: argparse.ArgumentParser, tasks_flag: str) -> None:
    _add_model(sub)
    sub.add_argument(tasks_flag, type=Path, metavar="DIR",
                     help="directory of k-shot task files (*.jsonl); default: the tasks shipped with editflow")
    sub.add_argument("--shots", type=_counts, default=(0, 1, 5), metavar="K1,K2", help="examples per prompt (default: 0,1,5)")
    sub.add_argument("--max-rows", type=int, metavar="R", help="score at most R rows of each task (default: all)")
    sub.add_argument("--batch-size", type=int, default=8, metavar="B", help="rows per forward pass (default: 8)")
    sub.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    sub.add_argument("--force", action="store_true", help="write into an existing non-empty --out directory")


def _add_saliency(commands: Any) -> None:
    sub = _subparser(
        commands, "saliency", "find the layer to edit: gradient saliency per layer (SaLEM)",
        "SaLEM layer saliency (salient-layers editing, EACL 2024). The edit dataset of FILE:\n"
        "fail samples (prompt -> target_new), adapt samples (each rephrase -> target_new) and\n"
        "pass samples (prompts the model already answers right: the locality prompts with the\n"
        "model's own greedy answer, or the --heldout pairs it gets right). For every sample, the mean\n"
        "|gradient| of the loss w.r.t. each --roles weight of every layer; a layer's score is the\n"
        "mean over its roles and samples (all three groups); the highest is the layer to edit.\n"
        "Samples are sharded across --workers Ray workers (0: this process) that return sums, so\n"
        "the scores do not depend on the worker count; the workers build the model from one copy\n"
        "of the weights in the Ray object store. Writes DIR/saliency.json (scores per layer, role\n"
        "and group, the chosen layer, counts, seconds) and DIR/saliency.png.\n\n"
        "example:\n  editflow saliency --model smollm2-135m --facts facts.jsonl --workers 2 --out analysis/saliency",
    )
    _add_model(sub)
    _add_facts(sub)
    sub.add_argument("--heldout", type=Path, metavar="FILE",
                     help="facts file of (prompt, target_new) pairs for the pass samples, kept where the model gets them "
                          "right (default: the facts' locality prompts with the model's own answers)")
    sub.add_argument("--roles", default="mlp_in,mlp_out,attn_out", metavar="R1,R2",
                     help="weights scored in every layer (default: mlp_in,mlp_out,attn_out)")
    _add_ray_workers(sub)
    sub.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    sub.add_argument("--force", action="store_true", help="write into an existing non-empty --out directory")
    sub.set_defaults(handler=_cmd_saliency)


def _add_train_editor(commands: Any) -> None:
    sub = _subparser(
        commands, "train-editor", "train a MEND (or, with --salient, SaLEM) editor network",
        "Train a MEND editor network for MODEL on the facts in TRAIN (each needs a locality prompt):\n"
        "every step edits a batch of facts with the editor and scores the edited model (NLL of the\n"
        "new target on prompt and rephrases + KL on locality prompts); only the editor learns.\n"
        "Runs on --workers Ray Train workers with DeepSpeed ZeRO --zero-stage (0: plain DDP),\n"
        "optimizer offload with --offload. Checkpoints every `checkpoint_every` steps; a failed\n"
        "worker resumes from the last one, and rerunning the same command (same --out) resumes a\n"
        "stopped run. --salient (SaLEM): pick the most salient layer by gradient saliency first\n"
        "(--salient-by edit_gain: the layer where one calibrated plain low-rank step lowers the\n"
        "training loss most), and train an editor of that layer on SVD-compressed gradients of\n"
        "groups of 10 requests. Each layer's edit rate starts where a plain step does best\n"
        "(`edit_lr_grid` in --config; empty turns the search off).\n"
        "Writes DIR/editor (use it with `editflow edit --method mend|salem --editor DIR/editor`),\n"
        "DIR/history.json and DIR/training.png, and logs the run to MLflow.\n\n"
        "example:\n  editflow train-editor --model smollm2-135m --facts train.json --val val.json --steps 300 --out editors/mend",
    )
    _add_model(sub)
    _add_facts(sub)
    sub.add_argument("--val", type=Path, metavar="FILE", help="validation facts, scored every `val_every` steps")
    sub.add_argument("--layers", type=_layers, metavar="L1,L2", help="layers whose weights the editor edits (default: the last three)")
    sub.add_argument("--roles", metavar="R1,R2", help="weights edited in each layer (default: mlp_in,mlp_out)")
    sub.add_argument("--salient", action="store_true", help="SaLEM: the single most salient layer (overrides --layers)")
    sub.add_argument("--salient-by", choices=("gradient", "edit_gain"), default="gradient",
                     help="choose the SaLEM layer by gradient saliency (the paper) or by the loss after one calibrated "
                          "plain low-rank step on each layer (default: gradient)")
    sub.add_argument("--salient-layers", type=_layers, metavar="L1,L2", help="candidate layers for --salient (default: all)")
    sub.add_argument("--saliency-rows", type=int, default=20, metavar="R", help="facts scored to choose the salient layer (default: 20)")
    sub.add_argument("--max-rows", type=int, metavar="R", help="train on at most the first R facts")
    sub.add_argument("--steps", type=int, metavar="S", help="optimizer steps (overrides the config)")
    sub.add_argument("--batch-size", type=int, metavar="B", help="facts per step and worker (overrides the config)")
    sub.add_argument("--config", type=Path, metavar="YAML", help="training config (MendTrainConfig fields; strict)")
    sub.add_argument("--net-config", type=Path, metavar="YAML", help="editor network config (MendNetConfig fields; strict)")
    sub.add_argument("--workers", type=int, default=2, metavar="N", help="Ray Train workers (default: 2)")
    sub.add_argument("--cpus-per-worker", type=int, default=1, metavar="C", help="CPUs (and torch threads) per worker (default: 1)")
    sub.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage; 0 = plain DDP (default: 2)")
    sub.add_argument("--offload", action="store_true", help="offload optimizer state (and stage-3 parameters) to CPU")
    sub.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: a local cluster)")
    _add_tracking(sub)
    sub.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    sub.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (an existing one resumes its run)")
    sub.set_defaults(handler=_cmd_train_editor)


def _add_importance(commands: Any) -> None:
    sub = _subparser(
        commands, "importance", "score attention heads and FFN blocks for importance",
        "Gradient importance (Michel et al. 2019, as Bansal et al. 2023 use it) of every attention\n"
        "head and FFN block on k-shot tasks: the mean over tokens of |z . dL/dz| through a gate on\n"
        "each unit. Rows are sharded across --workers Ray workers (0: this process); the sums are\n"
        "added, so the scores do not depend on the worker count. Writes DIR/importance.json,\n"
        "DIR/heads.png (layers x heads) and DIR/ffn.png; --ablation adds the exact reference\n"
        "(accuracy / NLL change with each unit removed alone, its Spearman correlation with the\n"
        "gradient scores and the cost ratio), --induction the induction-head scores.\n\n"
        "example:\n  editflow importance --model smollm2-135m --shots 0,5 --workers 2 --out analysis/smollm2",
    )
    _add_analysis_inputs(sub, "--tasks")
    _add_ray_workers(sub)
    sub.add_argument("--ablation", action="store_true", help="also compute the exact ablation scores (L*H + L passes per row)")
    sub.add_argument("--induction", action="store_true", help="also score induction heads (prefix matching, copying)")
    sub.set_defaults(handler=_cmd_importance)


def _add_prune(commands: Any) -> None:
    sub = _subparser(
        commands, "prune", "remove the least important heads / FFN blocks and measure accuracy",
        "Remove the lowest-scoring --heads fraction of attention heads and --ffn fraction of FFN\n"
        "blocks (scores from `editflow importance`), save the pruned model as an edit artifact\n"
        "(DIR/artifact: the removed heads' output-projection columns and FFN output projections\n"
        "zeroed), evaluate every task before and after, and draw accuracy-vs-removed curves over\n"
        "--curve-heads / --curve-ffn (DIR/prune.json, curves.json, curves.png).\n\n"
        "example:\n  editflow prune --model smollm2-135m --scores analysis/smollm2 --heads 0.5 --ffn 0.2 --out pruned/smollm2",
    )
    _add_analysis_inputs(sub, "--eval")
    sub.add_argument("--scores", type=Path, required=True, metavar="DIR", help="output directory of `editflow importance`")
    sub.add_argument("--heads", type=float, default=0.0, metavar="P", help="fraction of heads to remove (default: 0)")
    sub.add_argument("--ffn", type=float, default=0.0, metavar="Q", help="fraction of FFN blocks to remove (default: 0)")
    sub.add_argument("--curve-heads", type=_fractions, default=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), metavar="P1,P2",
                     help="head fractions of the accuracy curve (default: 0.1,...,0.7)")
    sub.add_argument("--curve-ffn", type=_fractions, default=(0.1, 0.2, 0.3), metavar="Q1,Q2",
                     help="FFN fractions of the accuracy curve (default: 0.1,0.2,0.3)")
    sub.add_argument("--iterative", action="store_true", help="rescore the heads after each step of the head curve instead of ranking once")
    sub.add_argument("--rank-by", choices=("gradient", "taylor"), default="gradient",
                     help="gradient: mean |z . dL/dz| per token (Michel et al.); taylor: the first-order estimate of the loss "
                          "increase when the unit is removed, which ranks closer to exact ablation (docs/benchmarks.md)")
    sub.add_argument("--save-model", action="store_true", help="also save the whole pruned model (save_pretrained) in DIR/model")
    sub.set_defaults(handler=_cmd_prune)


def _add_run(commands: Any) -> None:
    sub = _subparser(
        commands, "run", "run a pipeline YAML on Ray and record it in MLflow",
        "Validate the pipeline spec (before any Ray call), run its steps on a Ray model worker\n"
        "and log one MLflow run (params, metrics, the edit artifact, a before/after table and\n"
        "chart). A local copy of the outputs goes to ./runs/<name>-<run id>/.",
    )
    sub.add_argument("pipeline", type=Path, metavar="PIPELINE.yaml", help="the pipeline spec")
    sub.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    _add_tracking(sub)
    sub.add_argument("--output-dir", type=Path, metavar="DIR", help="where the local run directory goes (default: ./runs)")
    sub.set_defaults(handler=_cmd_run)


def _add_demo(commands: Any) -> None:
    sub = _subparser(
        commands, "demo", "edit six well-known facts of SmolLM2-135M and show the result",
        "Run the example pipeline shipped with editflow: six facts SmolLM2-135M-Instruct gets\n"
        "right (the capital of France, ...) changed to false ones with FT+KL on a local Ray,\n"
        "measured before and after, and logged to MLflow. Takes a few minutes on 2 CPU cores.",
    )
    _add_tracking(sub)
    sub.add_argument("--output-dir", type=Path, metavar="DIR", help="where the local run directory goes (default: ./runs)")
    sub.set_defaults(handler=_cmd_demo)


EDITS_ACTIONS = {
    "list": "versions with their aliases, method, edits, gates and metrics",
    "show": "one version (default: the champion): lineage, facts, metrics",
    "diff": "facts added / removed and metric changes between two versions",
    "promote": "make VERSION the champion",
    "rollback": "move champion back to the champion before it",
}


def _add_edits(commands: Any) -> None:
    sub = _subparser(
        commands, "edits", "manage registered edit versions (MLflow Model Registry)",
        "Every pipeline run that edits registers a version of NAME (default <model>-edits) with\n"
        "the alias `candidate`; `champion` marks the version that serves. Actions:\n"
        + "".join(f"  {name:<9} {text}\n" for name, text in EDITS_ACTIONS.items())
        + "\nexamples:\n  editflow edits list smollm2-135m-edits\n  editflow edits diff smollm2-135m-edits 1 2\n"
        "  editflow edits promote smollm2-135m-edits 3\n  editflow edits rollback smollm2-135m-edits",
    )
    sub.add_argument("action", choices=list(EDITS_ACTIONS), help="what to do")
    sub.add_argument("name", metavar="NAME", help="registered model name")
    sub.add_argument("versions", nargs="*", metavar="VERSION",
                     help="show: one (number or alias, default champion); diff: two; promote: one")
    _add_tracking(sub)
    sub.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    sub.set_defaults(handler=_cmd_edits)


def _add_serve(commands: Any) -> None:
    sub = _subparser(
        commands, "serve", "serve registered edit versions over HTTP (Ray Serve)",
        "Start a Ray Serve app for registered model NAME: POST /generate {prompt, max_new_tokens,\n"
        "version} answers with the text and the version that produced it; GET /healthz; OpenAPI\n"
        "docs at /docs. Requests without a version get ALIAS (re-read every --refresh-s seconds,\n"
        "so promote / rollback take effect without a restart). Runs until Ctrl-C.\n\n"
        "example:\n  editflow serve --name smollm2-135m-demo --port 8000\n"
        "  curl -s localhost:8000/generate -H 'content-type: application/json' -d '{\"prompt\": \"The capital of France is\"}'",
    )
    sub.add_argument("--name", required=True, help="registered model name")
    sub.add_argument("--alias", default="champion", help="alias served by default (default: champion)")
    sub.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1, loopback only)")
    sub.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    sub.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    sub.add_argument("--refresh-s", type=float, default=10.0, help="seconds between alias look-ups (default: 10)")
    sub.add_argument("--replicas", type=int, default=1, help="number of replicas (default: 1)")
    sub.add_argument("--cpus-per-replica", type=float, default=0.5, help="CPUs each replica reserves (default: 0.5)")
    _add_tracking(sub)
    sub.set_defaults(handler=_cmd_serve)


def _add_jobs_address(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--address", metavar="URL",
                     help="the cluster's Jobs API (dashboard) address (default: $RAY_ADDRESS if http(s), else http://127.0.0.1:8265)")


def _add_submit(commands: Any) -> None:
    sub = _subparser(
        commands, "submit", "submit a pipeline to a Ray cluster as a Ray job",
        "Validate the pipeline here (a bad YAML or facts file is refused before anything is sent),\n"
        "then submit `editflow run` as a Ray job: the YAML and its facts files travel as the job's\n"
        "working_dir, the tracking URI in its environment. The cluster must have editflow\n"
        "installed (ray_cluster.yaml does that). Token auth: see README.\n\n"
        "example:\n  editflow submit refresh.yaml --address http://127.0.0.1:8265 --tracking-uri http://mlflow:5000",
    )
    sub.add_argument("pipeline", type=Path, metavar="PIPELINE.yaml", help="the pipeline spec")
    _add_jobs_address(sub)
    _add_tracking(sub)
    sub.add_argument("--wait", action="store_true", help="wait for the job to end, print its logs, exit 0 only if it succeeded")
    sub.set_defaults(handler=_cmd_submit)


JOBS_ACTIONS = ("list", "status", "logs", "stop")


def _add_jobs(commands: Any) -> None:
    sub = _subparser(
        commands, "jobs", "list, inspect and stop Ray jobs on a cluster",
        "list: every job (id, status, pipeline); status JOB_ID; logs JOB_ID; stop JOB_ID.",
    )
    sub.add_argument("action", choices=JOBS_ACTIONS, help="what to do")
    sub.add_argument("job_id", nargs="?", metavar="JOB_ID", help="the job (status, logs, stop)")
    _add_jobs_address(sub)
    sub.add_argument("--json", action="store_true", help="print JSON (list, status)")
    sub.set_defaults(handler=_cmd_jobs)


def _add_state(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--state", type=Path, metavar="FILE",
                     help="the schedules file (default: $EDITFLOW_SCHEDULES, else ~/.editflow/schedules.db)")


def _add_schedule(commands: Any) -> None:
    sub = _subparser(
        commands, "schedule", "add, list or remove scheduled pipeline runs (cron, UTC)",
        "Schedules are stored in a SQLite file and run by `editflow scheduler run`.\n\n"
        "examples:\n  editflow schedule add --name nightly --cron '0 3 * * *' --pipeline refresh.yaml\n"
        "  editflow schedule list\n  editflow schedule remove nightly",
    )
    sub.add_argument("action", choices=("add", "list", "remove"), help="what to do")
    sub.add_argument("schedule", nargs="?", metavar="NAME", help="remove: the schedule's name")
    sub.add_argument("--name", help="add: the schedule's name")
    sub.add_argument("--cron", help="add: cron expression, five fields, UTC (e.g. '0 3 * * *': daily at 03:00)")
    sub.add_argument("--pipeline", type=Path, metavar="P.yaml", help="add: the pipeline to run (validated now)")
    sub.add_argument("--address", metavar="URL", help="add: submit to this cluster's Jobs API (default: run where the scheduler runs)")
    _add_tracking(sub)
    _add_state(sub)
    sub.add_argument("--json", action="store_true", help="list: print JSON")
    sub.set_defaults(handler=_cmd_schedule)


def _add_scheduler(commands: Any) -> None:
    sub = _subparser(
        commands, "scheduler", "run the scheduler (runs due schedules; long-running)",
        "Runs every due schedule once (a slot missed while the scheduler was down runs once at\n"
        "start), then sleeps --poll-s seconds and repeats; --once runs what is due and exits\n"
        "(for cron or a systemd timer). A schedule never runs twice at once.",
    )
    sub.add_argument("action", choices=("run",), help="run the scheduler")
    sub.add_argument("--once", action="store_true", help="run what is due now and exit")
    sub.add_argument("--poll-s", type=float, default=30.0, help="seconds between checks (default: 30)")
    _add_state(sub)
    sub.set_defaults(handler=_cmd_scheduler)


def _add_model(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", required=True, metavar="M",
                     help="model: alias (smollm2-135m), local directory, .gguf file or Hugging Face hub id")


def _add_facts(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--facts", type=Path, required=True, metavar="FILE", help="facts file (JSONL, JSON, CSV or parquet)")


def _add_tracking(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--tracking-uri", metavar="URI",
                     help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns.db)")


def _layers(text: str) -> tuple[int, ...]:
    """argparse type for --layers: "4,5,-1" -> (4, 5, -1)."""
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,5,6, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one layer")
    return layers


def _counts(text: str) -> tuple[int, ...]:
    """argparse type for --shots: "0,1,5" -> (0, 1, 5)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,5, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected one or more counts >= 0, got {text!r}")
    return values


def _fractions(text: str) -> tuple[float, ...]:
    """argparse type for fraction lists: "0.1,0.5" -> (0.1, 0.5), each in [0, 1]."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.1,0.5, got {text!r}") from None
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in [0, 1], got {text!r}")
    return values


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `editflow` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("editflow: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # the library's input errors are ValueErrors
        _report_error(exc, args.verbose)
        return EXIT_USER_ERROR


def _report_error(exc: BaseException, verbose: int) -> None:
    """The error on stderr: every problem of bad facts, else the message; the traceback with -v."""
    from editing_core.data import FactsValidationError

    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, FactsValidationError):
        count = len(exc.problems)
        print(f"editflow: invalid facts ({count} problem{'s' if count != 1 else ''}):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return
    print(f"editflow: error: {exc}", file=sys.stderr)
    if not verbose:
        print("(run with -v for details)", file=sys.stderr)


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Our loggers at INFO (DEBUG with -v, WARNING with -q); other libraries at WARNING."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)


# ---------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    from editing_core.data import load_facts_with_format, summarize_facts

    fmt, requests = load_facts_with_format(args.file)
    print(f"{args.file}: valid, {fmt} format")
    summary = summarize_facts(requests)
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        print(f"  {key.ljust(width)}  {value}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# edit and eval (in this process, no Ray)
# ---------------------------------------------------------------------------------------


def _cmd_edit(args: argparse.Namespace) -> int:
    from editing_core.data import load_facts
    from editing_core.editors import make_editor

    requests = load_facts(args.facts)  # bad facts fail before anything loads
    _check_method(args.method)
    editor = make_editor(args.method, args.config, **_layer_overrides(args.method, args.layers), **_editor_override(args.method, args.editor), progress=True)
    _check_out_dir(args.out, args.force)
    parent = _load_artifact(args.parent, "--parent") if args.parent else None
    loaded = _load_model(args.model)
    _check_lengths(loaded, requests)
    with _attached(parent, loaded, args.parent):
        started = time.perf_counter()
        artifact = editor.edit(loaded, requests, parent=parent)
        seconds = time.perf_counter() - started
    artifact.save(args.out)
    _print_edit_summary(artifact, args.out, seconds)
    return EXIT_OK


def _editor_override(method: str, editor: Path | None) -> dict[str, Any]:
    """--editor as the `editor` field of the methods that apply a trained editor (mend, salem)."""
    import dataclasses

    from editing_core.editors import EDITORS

    if editor is None:
        return {}
    if "editor" not in {f.name for f in dataclasses.fields(EDITORS[method].config_class)}:
        raise UsageError(f"--editor: {method} uses no trained editor (mend and salem do)")
    if not editor.is_dir():
        raise UsageError(f"--editor {editor}: no such directory")
    return {"editor": str(editor)}


def _layer_overrides(method: str, layers: tuple[int, ...] | None) -> dict[str, Any]:
    """--layers as the method's config field: `layers`, or `layer` for one-layer methods (GRACE)."""
    import dataclasses

    from editing_core.editors import EDITORS

    if layers is None:
        return {}
    fields = {f.name for f in dataclasses.fields(EDITORS[method].config_class)}
    if "layers" in fields:
        return {"layers": layers}
    if "layer" in fields and len(layers) == 1:
        return {"layer": layers[0]}
    if "layer" not in fields:
        raise UsageError(f"--layers: {method} edits the layers its trained editor was trained for")
    raise UsageError(f"--layers: {method} edits one layer; give exactly one index (got {','.join(map(str, layers))})")


def _cmd_stream(args: argparse.Namespace) -> int:
    from editing_core.config import config_to_dict
    from editing_core.data import load_facts
    from editing_core.editors import make_editor
    from editing_core.sequential import StreamConfig, run_stream
    from pipelines.report import plot_stream, write_json

    requests = load_facts(args.facts)
    if args.n is not None:
        if args.n < 1:
            raise UsageError(f"--n must be >= 1, got {args.n}")
        requests = requests[: args.n]
    unrelated = _unrelated_pairs(args.unrelated, requests)
    _check_method(args.method)
    overrides = _layer_overrides(args.method, (args.layer,) if args.layer is not None else None)
    editor = make_editor(args.method, args.config, **overrides)
    config = StreamConfig(every=args.every)
    _check_out_dir(args.out, args.force)
    loaded = _load_model(args.model)
    _check_lengths(loaded, requests)
    result = run_stream(loaded, editor, requests, unrelated, config)
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"model": args.model, "facts": str(args.facts), "method": args.method,
                "config": config_to_dict(editor.config), "summary": result.summary, "series": result.series}
    write_json(document, args.out / "stream.json")
    plot_stream({args.method: result.series}, args.out / "stream.png", f"{args.method} stream on {args.model}")
    assert result.artifact is not None
    result.artifact.save(args.out / "artifact")
    from pipelines.report import format_rows

    print(format_rows(result.series, columns=("edits", "err", "trr", "paraphrase", "newest_success", "size", "seconds_per_edit")))
    print(f"\nwrote {args.out / 'stream.json'}, {args.out / 'stream.png'} and the artifact in {args.out / 'artifact'}")
    return EXIT_OK


def _analysis_tasks(args: argparse.Namespace, directory: Path | None) -> tuple[list[Any], Any]:
    """The tasks (checked: enough examples for every --shots) and the importance config."""
    from editing_core.importance import ImportanceConfig, load_tasks

    if args.max_rows is not None and args.max_rows < 1:
        raise UsageError(f"--max-rows must be >= 1, got {args.max_rows}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    tasks = load_tasks(directory)
    if not tasks:
        raise UsageError(f"{directory}: no task files (*.jsonl) in this directory")
    for task in tasks:
        if max(args.shots) > task.max_shots:
            raise UsageError(f"task {task.name}: --shots {max(args.shots)} needs that many examples per row; it has {task.max_shots}")
    config = ImportanceConfig(shots=args.shots[0], batch_size=args.batch_size, max_rows=args.max_rows, progress=True)
    return tasks, config


def _cmd_saliency(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from editing_core.data import load_facts
    from editing_core.saliency import SaliencyConfig, build_samples, count_groups, write_saliency
    from tasks.saliency import sharded_saliency
    from tasks.sharding import ray_connected

    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0 (0: this process), got {args.workers}")
    requests = load_facts(args.facts)  # bad facts fail before anything loads
    held = load_facts(args.heldout) if args.heldout else None
    try:
        config = SaliencyConfig(roles=tuple(part.strip() for part in args.roles.split(",") if part.strip()), progress=True)
    except ValueError as exc:
        raise UsageError(f"--roles: {exc}") from None
    _check_out_dir(args.out, args.force)
    loaded = _load_model(args.model)  # the driver needs it for the pass samples' answers
    _check_lengths(loaded, [*requests, *(held or [])])
    started = time.perf_counter()
    samples = build_samples(loaded, requests, [(r.prompt, r.target_new) for r in held] if held is not None else None)
    seconds = {"samples": time.perf_counter() - started}
    counts = count_groups(samples)
    log.info("edit dataset: %s", ", ".join(f"{n} {group}" for group, n in counts.items()))
    session = ray_connected(args.address, args.workers * args.cpus_per_worker, "--workers x --cpus-per-worker") if args.workers else nullcontext()
    with session:
        started = time.perf_counter()
        sums = sharded_saliency(args.model, samples, config, args.workers, args.cpus_per_worker, loaded, share_weights=True)
        seconds["gradients"] = time.perf_counter() - started
    files = write_saliency(sums, args.out, f"saliency of {args.model}", model=args.model, facts=str(args.facts),
                           heldout=str(args.heldout) if args.heldout else None,
                           pass_source="heldout" if held is not None else "locality", workers=args.workers,
                           cpus_per_worker=args.cpus_per_worker, weights_from="object store" if args.workers else "driver",
                           seconds=seconds)
    scores = sums.scores()
    layers = scores.layer_scores
    print(f"scored {len(samples)} samples ({', '.join(f'{n} {g}' for g, n in counts.items())}) on {sums.num_layers} layers x "
          f"{len(config.roles)} roles in {seconds['gradients']:.1f} s ({args.workers or 'no'} Ray workers)")
    print(f"most salient layer: {scores.chosen_layer} (score {float(layers[scores.chosen_layer]):.4g}); next: "
          + ", ".join(f"{int(i)} ({float(layers[i]):.4g})" for i in layers.argsort(descending=True)[1:5]))
    print("per group:", ", ".join(f"{g} layer {s.chosen_layer}" for g, s in scores.by_group.items()))
    print("wrote " + ", ".join(str(f) for f in files))
    return EXIT_OK


def _cmd_train_editor(args: argparse.Namespace) -> int:
    from editing_core.config import load_config
    from editing_core.data import load_facts
    from editing_core.editors.mend import MendNetConfig, MendTrainConfig
    from pipelines.editor_training import EditorTrainingSpec, train_editor_run
    from tasks.mend_train import DistributedConfig
    from tasks.sharding import ray_connected

    load_facts(args.facts, allow_conflicts=True)  # bad facts fail before Ray starts
    if args.val:
        load_facts(args.val, allow_conflicts=True)
    net_overrides: dict[str, Any] = {}
    if args.layers:
        net_overrides["layers"] = args.layers
    if args.roles:
        net_overrides["roles"] = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    train_overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    try:
        net = load_config(MendNetConfig, args.net_config, **net_overrides)
        train = load_config(MendTrainConfig, args.config, **train_overrides)
        dist = DistributedConfig(workers=args.workers, cpus_per_worker=args.cpus_per_worker, zero_stage=args.zero_stage, offload=args.offload)
        tracking = None
        if not args.no_mlflow:
            from infra.tracking import resolve_tracking_uri

            tracking = resolve_tracking_uri(args.tracking_uri)
        spec = EditorTrainingSpec(model=args.model, facts=args.facts, val=args.val, net=net, train=train, distributed=dist,
                                  salient=args.salient, salient_by=args.salient_by, salient_layers=args.salient_layers or (),
                                  saliency_rows=args.saliency_rows, max_rows=args.max_rows, tracking_uri=tracking)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if (args.out / "ray_train").is_dir():
        print(f"resuming the run in {args.out} from its last checkpoint", file=sys.stderr)
    with ray_connected(args.address, dist.workers * dist.cpus_per_worker, "--workers x --cpus-per-worker", error=UsageError):
        result = train_editor_run(spec, args.out)
    last = result.history[-1]
    print(f"trained {int(last['step'])} steps on {dist.workers} worker(s) (ZeRO stage {dist.zero_stage}"
          f"{', offload' if dist.offload else ''}) in {result.seconds:.0f} s")
    print("last window: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step"))
    if spec.train.select_by:
        from tasks.mend_train import OUT_LAST_EDITOR_DIR

        print(f"selected the editor of step {result.selected_step} by val_{spec.train.select_by} "
              f"(the last step's: {args.out / OUT_LAST_EDITOR_DIR})")
    print(f"editor: {result.editor_dir}  (editflow edit --method {'salem' if args.salient else 'mend'} --editor {result.editor_dir} ...)")
    return EXIT_OK


def _cmd_importance(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from pipelines.analysis import score_model, write_scores
    from tasks.sharding import ray_connected

    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0 (0: this process), got {args.workers}")
    tasks, config = _analysis_tasks(args, args.tasks)
    _check_out_dir(args.out, args.force)
    loaded = _load_model(args.model) if args.workers == 0 or args.induction else None
    induction = None
    if args.induction:
        from editing_core.induction import InductionConfig

        induction = InductionConfig(progress=True)
    session = ray_connected(args.address, args.workers * args.cpus_per_worker, "--workers x --cpus-per-worker") if args.workers else nullcontext()
    with session:
        scores = score_model(args.model, tasks, args.shots, config, args.workers, args.cpus_per_worker, loaded,
                             ablation=args.ablation, induction=induction)
    files = write_scores(scores, args.out)
    from editing_core.induction import top_heads

    print(f"scored {scores.head.shape[0]} layers x {scores.head.shape[1]} heads on {len(tasks)} task(s) at shots "
          f"{list(args.shots)} in {scores.seconds['gradient']:.1f} s ({args.workers or 'no'} Ray workers)")
    print("most important heads (layer, head):", top_heads(scores.head, 5))
    print("most important FFN layers:", [int(i) for i in scores.ffn.argsort(descending=True)[:5]])
    if scores.ablation is not None:
        print("Spearman(gradient, ablation NLL increase): heads %.3f, FFN %.3f; ablation cost %.1fx the gradient scores" % (
            scores.ablation["spearman"]["heads_vs_nll_increase"], scores.ablation["spearman"]["ffn_vs_nll_increase"],
            scores.ablation["cost_ratio"]))
    if scores.induction is not None:
        print("top induction heads:", top_heads(scores.induction.prefix_matching, 5), "overlap:", scores.overlap)
    print("wrote " + ", ".join(str(f) for f in files))
    return EXIT_OK


def _cmd_prune(args: argparse.Namespace) -> int:
    from pipelines.analysis import prune_model, read_scores, write_pruning

    for flag in ("heads", "ffn"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise UsageError(f"--{flag} must be a fraction in [0, 1], got {getattr(args, flag)}")
    head_scores, ffn_scores, _ = read_scores(args.scores, args.rank_by)
    tasks, config = _analysis_tasks(args, args.eval)
    _check_out_dir(args.out, args.force)
    loaded = _load_model(args.model)
    pruning = prune_model(loaded, tasks, args.shots, head_scores, ffn_scores, args.heads, args.ffn,
                          args.curve_heads, args.curve_ffn, args.iterative, config, args.rank_by)
    files = write_pruning(pruning, args.out, f"pruning {args.model}")
    if args.save_model:
        with pruning.artifact.attached(loaded.model):
            loaded.model.save_pretrained(args.out / "model")
            loaded.tokenizer.save_pretrained(args.out / "model")
        files.append(args.out / "model")
    from pipelines.report import format_rows

    print(format_rows(pruning.accuracy, columns=("task", "shots", "unpruned", "pruned")))
    print("share removable within 1 point of accuracy:", pruning.removable)
    print("wrote " + ", ".join(str(f) for f in files) + f" and the pruned model's edit artifact in {args.out / 'artifact'}")
    return EXIT_OK


def _unrelated_pairs(path: Path | None, requests: Sequence[Any]) -> list[tuple[str, str]]:
    """TRR pairs: a facts file's (prompt, target_new), else the requests' locality pairs."""
    from editing_core.data import load_facts

    if path is not None:
        return [(r.prompt, r.target_new) for r in load_facts(path)]
    pairs = [(r.locality_prompt, r.locality_answer) for r in requests if r.locality_prompt and r.locality_answer]
    if not pairs:
        log.warning("no unrelated pairs (no --unrelated file, no locality prompts with answers): TRR is not measured")
    return pairs


def _check_method(method: str) -> None:
    from editing_core.editors import editor_names

    if method not in editor_names():
        raise UsageError(f"--method: unknown editing method {method!r}; available: {', '.join(editor_names())}")


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out}: directory is not empty (use --force to overwrite the artifact in it)")


def _print_edit_summary(artifact: "EditArtifact", out: Path, seconds: float) -> None:
    tensors = artifact.tensors()
    values = sum(t.numel() for t in tensors.values())
    names = artifact.meta.hashed_params
    print(f"method:          {artifact.meta.method}")
    print(f"requests:        {len(artifact.requests)}")
    print(f"params touched:  {len(names)} ({', '.join(names)}); {values:,} values stored")
    print(f"seconds:         {seconds:.1f}")
    print(f"artifact:        {out} (id {artifact.meta.artifact_id}" + (f", parent {artifact.meta.parent})" if artifact.meta.parent else ")"))


def _cmd_eval(args: argparse.Namespace) -> int:
    from editing_core.data import load_facts
    from editing_core.evaluate import EvalConfig, evaluate

    requests = load_facts(args.facts)
    heldout = [(r.prompt, r.target_new) for r in load_facts(args.heldout)] if args.heldout else None
    artifact = _load_artifact(args.artifact, "--artifact") if args.artifact else None
    parent = _load_artifact(args.parent, "--parent") if args.parent else None
    if parent is not None and artifact is None:
        raise UsageError("--parent is only used together with --artifact")
    loaded = _load_model(args.model)
    _check_lengths(loaded, requests)
    with _attached(parent, loaded, args.parent):
        if artifact is not None:
            _check_base(artifact, loaded, args.artifact)
        report = evaluate(loaded, requests, artifact, heldout, EvalConfig(progress=not args.json))
    if args.json:
        print(json.dumps({**report.metrics, "rows": report.rows}, ensure_ascii=False))
        return EXIT_OK
    from pipelines.report import format_metrics, format_rows

    print(format_rows(report.rows))
    print()
    print(format_metrics(report.metrics))
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# shared helpers of edit / eval
# ---------------------------------------------------------------------------------------


def _load_model(name: str) -> "LoadedModel":
    from editing_core.models import load_model

    started = time.perf_counter()
    try:
        loaded = load_model(name)
    except OSError as exc:
        raise UsageError(f"--model {name}: cannot load the model: {exc}") from exc
    log.info("loaded %s (%s, %d layers) in %.1f s", name, loaded.adapter.model_type, loaded.adapter.num_layers,
             time.perf_counter() - started)
    return loaded


def _load_artifact(path: Path, flag: str) -> "EditArtifact":
    from editing_core.artifacts import ArtifactError, load_artifact

    if not path.is_dir():
        raise ArtifactError(f"{flag} {path}: no such directory")
    return load_artifact(path)


def _check_lengths(loaded: "LoadedModel", requests: Sequence[Any]) -> None:
    from editing_core.data import check_prompt_lengths

    context = loaded.adapter.context_length
    if context is None:
        log.warning("%s declares no context length; prompt lengths are not checked", loaded.name)
        return
    check_prompt_lengths(requests, loaded.tokenizer, context)


def _check_base(artifact: "EditArtifact", loaded: "LoadedModel", where: Path) -> None:
    """Refuse, before any scoring, an artifact computed on other weights than the loaded model's."""
    from editing_core.artifacts import ArtifactError, weights_hash

    meta = artifact.meta
    try:
        actual = weights_hash(loaded.model, meta.hashed_params)
    except ArtifactError as exc:
        actual = f"(not comparable: {exc})"
    if actual != meta.base_hash:
        parent_hint = f" with its parent artifact {meta.parent} attached (--parent)" if meta.parent else ""
        raise ArtifactError(
            f"{where}: this artifact was made on base model {meta.base_model!r}{parent_hint}; the weights of "
            f"{loaded.name!r} differ (hash {actual[:12]}, expected {meta.base_hash[:12]}). "
            f"Evaluate it with --model {meta.base_model}"
        )


@contextmanager
def _attached(artifact: "EditArtifact | None", loaded: "LoadedModel", where: Path | None) -> Iterator[None]:
    """Attach `artifact` (a parent edit) for the duration of the block; no-op for None."""
    if artifact is None:
        yield
        return
    assert where is not None
    _check_base(artifact, loaded, where)
    with artifact.attached(loaded.model):
        yield


# ---------------------------------------------------------------------------------------
# run and demo (Ray + MLflow)
# ---------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.runner import run_pipeline

    result = run_pipeline(args.pipeline, address=args.address, tracking_uri=args.tracking_uri, output_dir=args.output_dir)
    _print_pipeline_result(result)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.runner import run_pipeline
    from pipelines.spec import load_pipeline

    with _demo_pipeline() as path:
        spec = load_pipeline(path)
        method = spec.edit.method if spec.edit else "no edit"
        print(f"editflow demo: editing the facts of {spec.facts.name} in {spec.model} with {method} "
              f"(pipeline {path})", flush=True)
        result = run_pipeline(spec, tracking_uri=args.tracking_uri, output_dir=args.output_dir)
    _print_pipeline_result(result)
    return EXIT_OK


def _cmd_edits(args: argparse.Namespace) -> int:
    from infra import registry
    from infra.tracking import check_reachable, resolve_tracking_uri

    wanted = {"list": (0, 0), "show": (0, 1), "diff": (2, 2), "promote": (1, 1), "rollback": (0, 0)}[args.action]
    if not wanted[0] <= len(args.versions) <= wanted[1]:
        count = str(wanted[0]) if wanted[0] == wanted[1] else f"{wanted[0]} or {wanted[1]}"
        raise UsageError(f"edits {args.action}: expected {count} VERSION argument(s), got {len(args.versions)}")
    uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    client = registry.client_for(uri)
    if args.action == "list":
        alias_map = registry.aliases(client, args.name)
        result: Any = [registry.version_summary(v, alias_map) for v in registry.list_versions(client, args.name)]
    elif args.action == "show":
        version = registry.get_version(client, args.name, args.versions[0] if args.versions else registry.CHAMPION)
        result = {**registry.version_summary(version, registry.aliases(client, args.name)),
                  "facts": registry.read_lineage_facts(uri, version)}
    elif args.action == "diff":
        result = registry.diff_versions(uri, args.name, *args.versions)
    elif args.action == "promote":
        previous = registry.promote(client, args.name, args.versions[0])
        result = {"champion": str(registry.get_version(client, args.name, registry.CHAMPION).version), "previous": previous}
    else:
        old, new = registry.rollback(client, args.name)
        result = {"champion": new, "rolled_back": old}
    if args.json:
        print(json.dumps(result, ensure_ascii=False, default=str))
    else:
        from pipelines.report import format_edits

        print(format_edits(args.action, args.name, result))
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    import ray

    from infra import registry
    from infra.serve import ServeOptions, start
    from infra.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    registry.get_version(registry.client_for(uri), args.name, args.alias)  # fail before Ray starts
    options = ServeOptions(name=args.name, tracking_uri=uri, alias=args.alias, refresh_s=args.refresh_s,
                           replicas=args.replicas, cpus_per_replica=args.cpus_per_replica)
    ray.init(address=args.address or None, logging_level=logging.WARNING,
             **({} if args.address else {"include_dashboard": False}))
    try:
        url = start(options, args.host, args.port)
        print(f"serving {args.name}@{args.alias} at {url}  (POST /generate, GET /healthz, docs at {url}/docs); Ctrl-C stops",
              flush=True)
        while True:
            time.sleep(3600)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _cmd_submit(args: argparse.Namespace) -> int:
    from infra import jobs
    from infra.tracking import resolve_tracking_uri

    job_id = jobs.submit_pipeline(args.pipeline, args.address, resolve_tracking_uri(args.tracking_uri))
    print(f"submitted {job_id}")
    print(f"  status: editflow jobs status {job_id}" + (f" --address {args.address}" if args.address else ""))
    if not args.wait:
        return EXIT_OK
    status = _wait_for_job(args.address, job_id)
    print(jobs.job_logs(args.address, job_id), end="")
    print(f"{job_id}: {status}")
    return EXIT_OK if status == "SUCCEEDED" else 1


def _wait_for_job(address: str | None, job_id: str, poll_s: float = 2.0) -> str:
    from infra import jobs

    while True:
        status = jobs.job_status(address, job_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(poll_s)


def _cmd_jobs(args: argparse.Namespace) -> int:
    from infra import jobs

    if args.action != "list" and not args.job_id:
        raise UsageError(f"jobs {args.action}: JOB_ID is required")
    if args.action == "list":
        rows = jobs.list_jobs(args.address)
        if args.json:
            print(json.dumps(rows, default=str))
        else:
            from pipelines.report import format_rows

            table = [{**r, "pipeline": r["metadata"].get("editflow_pipeline", "-")} for r in rows]
            print(format_rows(table, columns=("job_id", "status", "pipeline", "entrypoint", "message")))
    elif args.action == "status":
        row = jobs.job_status(args.address, args.job_id)
        print(json.dumps(row, default=str) if args.json else f"{row['job_id']}: {row['status']} {row['message'] or ''}".rstrip())
    elif args.action == "logs":
        print(jobs.job_logs(args.address, args.job_id), end="")
    else:
        stopped = jobs.stop_job(args.address, args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'already ended'}")
    return EXIT_OK


def _cmd_schedule(args: argparse.Namespace) -> int:
    from infra.scheduler import ScheduleStore

    store = ScheduleStore(args.state)
    if args.action == "add":
        missing = [flag for flag, value in (("--name", args.name), ("--cron", args.cron), ("--pipeline", args.pipeline)) if not value]
        if missing:
            raise UsageError(f"schedule add: {', '.join(missing)} required")
        schedule = store.add(args.name, args.cron, args.pipeline, args.address, args.tracking_uri)
        print(f"added schedule {schedule.name} ({schedule.cron}, UTC): next run {schedule.as_row()['next']}; state {store.path}")
    elif args.action == "remove":
        if not args.schedule:
            raise UsageError("schedule remove: NAME is required")
        store.remove(args.schedule)
        print(f"removed schedule {args.schedule}")
    else:
        rows = [s.as_row() for s in store.all()]
        if args.json:
            print(json.dumps(rows))
        else:
            from pipelines.report import format_rows

            print(format_rows(rows, columns=("name", "cron", "next", "last_run", "last_status", "address", "pipeline")))
    return EXIT_OK


def _cmd_scheduler(args: argparse.Namespace) -> int:
    from infra.scheduler import ScheduleStore, loop, run_due

    store = ScheduleStore(args.state)
    rounds = iter([run_due(store)]) if args.once else loop(store, args.poll_s)
    failed = False
    for results in rounds:
        for name, status, detail in results:
            print(f"{name}: {status} ({detail})", flush=True)
            failed |= status == "failed"
    return 1 if failed else EXIT_OK


@contextmanager
def _demo_pipeline() -> Iterator[Path]:
    """The packaged example pipeline as a real file next to its facts file.

    `pipelines/examples` is package data, found with importlib.resources (wheel, zip or editable
    install); files already on disk are used in place, others are copied out for the run.
    """
    import shutil
    import tempfile
    from importlib import resources

    try:
        examples: Any = resources.files("pipelines") / "examples"
    except NotADirectoryError:
        # CPython 3.11 cannot read resources of a namespace package whose path holds a
        # setuptools editable-finder placeholder (an editable install made before
        # pipelines/__init__.py existed); this module's own directory is the package then.
        examples = Path(__file__).resolve().parent / "examples"
    with resources.as_file(examples / "demo.yaml") as spec, resources.as_file(examples / "demo_facts.jsonl") as facts:
        if spec.parent == facts.parent:
            yield spec
            return
        with tempfile.TemporaryDirectory(prefix="editflow-demo-") as tmp:
            for source in (spec, facts):
                shutil.copy(source, Path(tmp) / source.name)
            yield Path(tmp) / spec.name


def _print_pipeline_result(result: "PipelineResult") -> None:
    from infra.tracking import ui_hint
    from pipelines.report import format_metrics, format_rows

    if result.rows:
        print(format_rows(result.rows))
        print()
    print(format_metrics(result.metrics))
    print()
    print(f"MLflow run {result.run_id} (experiment {result.experiment_name!r}, id {result.experiment_id})")
    print(f"  tracking URI:  {result.tracking_uri}")
    if result.artifact_dir is not None:
        print(f"  edit artifact: {result.artifact_dir} (id {result.artifact_id})")
    print(f"  local outputs: {result.output_dir}")
    reg = result.registration
    if reg is not None:
        state = "champion" if reg.promoted else "candidate (champion unchanged" + (
            f": gates failed: {'; '.join(reg.gate_failures)})" if reg.gate_failures else ")")
        print(f"  registry:      {reg.name} version {reg.version}, {state}")
        print(f"                 editflow edits show {reg.name} {reg.version}")
    hint = ui_hint(result.tracking_uri, result.experiment_id, result.run_id).splitlines()
    print(f"  open the UI:   {hint[0]}")
    for line in hint[1:]:
        print(f"                 {line}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
