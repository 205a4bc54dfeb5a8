"""MEND: editor networks that turn a fine-tuning gradient into a good edit in one step.

Paper: Mitchell et al. 2022, "Fast Model Editing at Scale", https://arxiv.org/abs/2110.11309.

The gradient of a loss L with respect to a linear weight W (out x in) is a sum of rank-1 terms
over the tokens the layer saw:
    dL/dW = sum_t delta_t u_t^T,    u_t = the layer's input at token t        (in,)
                                    delta_t = dL/d(layer output at token t)  (out,)
so it can be handled as N (u, delta) pairs instead of an out x in matrix. An editor network g
maps each pair to (u~, delta~), and the edit is
    W~ = W - eta_l * sum_t delta~_t u~_t^T
a low-rank update (rank <= N), stored as two factors in the edit artifact.

The editor network (`MendNet`), one per distinct (in, out) weight shape, shared by every
edited weight of that shape:
    z  = concat(u, delta)                          (in + out,)
    z' = (z - running_mean) / running_std          input normalisation (statistics of training)
    h  = z' + s1_l * U1 act(V1 z' + b1) + o1_l     residual block 1
    g  = h  + s2_l * U2 act(V2 h  + b2) + o2_l     residual block 2
    out = running_mean + running_std * g           back to the gradient's own scale
U1, U2 (dim x rank) start at zero and the per-layer offsets o at zero, so an untrained editor is
the identity and its edit is exactly the plain gradient step with rate eta_l. s_l and o_l are
the per-layer scale and offset of the edited weight l; eta_l, the per-layer edit rate, is learned.
(The paper feeds the normalised output straight into the update; we map it back so that the
identity editor is the plain gradient edit, and eta_l learns the step size from there.)

Gradient factors. `factors: tokens` (MEND) gives the editor every token's (u, delta) pair.
`factors: svd` (SaLEM, editors/salem.py) first sums the gradient over groups of `svd_group`
requests and keeps its top-`svd_rank` singular directions: G ~= sum_i s_i a_i b_i^T becomes the
pairs (sqrt(s_i) b_i, sqrt(s_i) a_i), computed from the token factors by two QR decompositions
(G is never formed).

Training (Algorithm 1, `mend_loss`): for a batch of edit requests, compute the pairs on the
unedited model, edit with the editor, then
    loss = c_edit * NLL(target_new | prompt and its rephrases; edited model)
         + c_loc  * KL(p_pre(. | x_loc) || p_edited(. | x_loc))
The base model is frozen; only the editor learns. The edited forward adds x -> (x u~^T)(-eta delta~)
to each edited layer's output through hooks, so gradients flow into the editor.
Distributed training (Ray Train + DeepSpeed) lives in tasks/mend_train.py; this module is pure torch.

Key whitening (`whiten_keys`, off by default): the editor's u~ is multiplied by the inverse
(damped) second moment of the weight's inputs, estimated on text before training, so the update
changes the outputs of inputs like the edited prompt and moves the common directions less.

Applying (Algorithm 2, `MendEditor.edit`): one forward and backward of the base model on the
requests, the editor, and the factors of the update. A batch of requests sums their loss, so the
batched edit equals the sum of the single edits.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..artifacts import EditArtifact, WeightDelta, WeightDeltaArtifact, weights_hash
from ..config import config_to_dict, load_config
from ..data.requests import EditRequest
from ..models.loading import LoadedModel
from ..tokens import (CompletionBatch, completion_batch, completion_ids, completion_logits, completion_nll, kl_from_reference,
                      pad_completions, subject_last_token, text_batch)
from .base import Editor, FoldingSession, check_targets, register_editor

log = logging.getLogger(__name__)

NET_CONFIG_NAME = "editor.json"
NET_WEIGHTS_NAME = "editor.safetensors"
FACTORS = ("tokens", "svd")
PAIR_POSITIONS = ("all", "subject")


# ---------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MendNetConfig:
    """The shape of a MEND editor network and which weights it edits (saved with the editor).

    layers:        layers whose weights are edited; negative counts from the end. The paper
                   edits the MLPs of the last three layers.
    roles:         which weights of each layer (mlp_in, mlp_out, attn_out).
    rank:          rank of each residual block's U V (the editor's hidden size).
    blocks:        number of residual blocks (the paper uses 2).
    edit_lr_init:  starting value of every per-layer edit rate eta_l, unless training
                   calibrates them (MendTrainConfig.edit_lr_grid, the default). 1e-3 is the best
                   plain gradient step for CounterFact facts on SmolLM2-135M's last three layers
                   together (edit NLL 10.0 -> 8.5; 1e-2 already overshoots).
    factors:       `tokens`: one (u, delta) pair per token (MEND); `svd`: the top-`svd_rank`
                   singular pairs of the gradient summed over each group of `svd_group`
                   requests (SaLEM).
    pair_positions: which token pairs the editor sees. "all" (the paper): every real token of
                   prompt + target; their sum is the weight's gradient. "subject": only the last
                   token of each request's subject in its prompt (needs `subject`), where ROME
                   and MEMIT write their edits. CounterFact's neighbour prompts share the
                   relation and the true object with the edited prompt: on SmolLM2-135M's layers
                   26-29, a rank-1 update along the whitened key of the prompt's last token
                   reaches them with 0.13-0.40 of its size, one along the subject's last token
                   with 0.02-0.04, no more than it reaches unrelated prompts
                   (benchmarks/key_overlap.py, docs/benchmarks.md). But the gradient there is
                   a poor value: a layer-27 editor trained on subject pairs (1000 steps) reached
                   0.54 edit success at 0.97 locality, 0.81 at 0.93 (edit_scale 2), no better
                   than the "all" editors' trade-off on 100 val rows.
    svd_rank:      singular directions kept per group (factors: svd).
    svd_group:     requests whose gradients are summed before the SVD (factors: svd).
    norm_eps:      added to the running variance before the square root.
    whiten_keys:   precondition the key side of every update by the inverse second moment of
                   that weight's inputs, u~ -> (C / s + whiten_damping I)^-1 u~ with
                   C = E[u u^T] over text and s = trace(C) / in (the C^-1 k of ROME and MEMIT,
                   Meng et al. 2022, https://arxiv.org/abs/2202.05262). The update then moves
                   the outputs of inputs like the edited prompt and leaves the common directions
                   (shared templates, e.g. the relation words of CounterFact's neighbour prompts)
                   mostly alone. C is estimated from the training facts before the first step
                   (`set_key_preconditioners`) and saved with the editor. Untrained, the edit is
                   the preconditioned gradient step; on SmolLM2-135M's layer 27 down projection,
                   at edit rate 1, it reached 0.98 edit success / 0.81 locality / 0.035 drawdown
                   on 40 CounterFact val rows, the plain step 0.90 / 0.55 / 0.082 (paraphrase
                   0.22 vs 0.28; benchmarks/key_whitening.py, docs/benchmarks.md).
    whiten_damping: lambda above, relative to the mean eigenvalue of C: larger is closer to the
                   plain step (1e-2 gave the best trade-off of 1e-2, 1e-1 and 1 there).
    """

    layers: tuple[int, ...] = (-3, -2, -1)
    roles: tuple[str, ...] = ("mlp_in", "mlp_out")
    rank: int = 64
    blocks: int = 2
    edit_lr_init: float = 1e-3
    factors: str = "tokens"
    pair_positions: str = "all"
    svd_rank: int = 8
    svd_group: int = 10
    norm_eps: float = 1e-8
    whiten_keys: bool = False
    whiten_damping: float = 1e-2

    def __post_init__(self) -> None:
        check_targets(self.layers, self.roles)
        if self.rank < 1 or self.blocks < 1 or self.svd_rank < 1 or self.svd_group < 1:
            raise ValueError("rank, blocks, svd_rank and svd_group must be >= 1")
        if self.factors not in FACTORS:
            raise ValueError(f"factors must be one of {FACTORS}, got {self.factors!r}")
        if self.pair_positions not in PAIR_POSITIONS:
            raise ValueError(f"pair_positions must be one of {PAIR_POSITIONS}, got {self.pair_positions!r}")
        if self.edit_lr_init <= 0:
            raise ValueError("edit_lr_init must be > 0")
        if self.whiten_damping <= 0:
            raise ValueError("whiten_damping must be > 0")


LOCALITY_POSITIONS = ("all", "answer")
LR_SCHEDULES = ("constant", "cosine")
# validation metrics an editor can be selected by, and whether higher is better
SELECTION_METRICS = {"loss": False, "edit_nll": False, "locality_kl": False, "edit_accuracy": True, "locality_agreement": True}


@dataclass(frozen=True)
class MendTrainConfig:
    """Training of a MEND editor (Algorithm 1 of the paper).

    steps:            optimizer steps.
    batch_size:       edit requests per step on each worker (edited together, as a batch).
    lr:               Adam learning rate of the editor's parameters. The paper trains for tens of
                      thousands of steps at 1e-6; for runs of a few hundred steps on a CPU, 1e-3
                      lowered the SmolLM2-135M training loss faster than 1e-4 (0.70 vs 0.78 after
                      60 steps of 2 facts, from 0.88).
    edit_lr_lr:       Adam learning rate of the per-layer edit rates eta_l (the paper's lr_lr).
    c_edit:           weight of the edit NLL on the prompt and its rephrases after the edit.
    c_loc:            weight of the KL between the pre- and post-edit model on locality texts.
    grad_clip:        clip the editor's gradient norm to this (0 turns clipping off).
    checkpoint_every: save a checkpoint (and report metrics) every this many steps.
    val_every:        evaluate on the validation rows every this many steps (0: only at the end).
    val_rows:         validation requests evaluated each time (the first ones of the file).
    seed:             seed of the editor's initialisation and of the row order.
    edit_lr_grid:     before the first step, each edited layer's edit rate starts at the value of
                      this grid whose plain gradient step (the untrained editor) gives the lowest
                      training loss on the first `calibration_rows` facts, layer by layer
                      (`calibrate_edit_rates`); empty: every rate starts at edit_lr_init. The
                      best step differs by four decades across SmolLM2-135M's layers (rank-8
                      SVD steps of 10 facts: 3e-4 on layer 29, 0.3 on layers 24-27), and Adam at
                      edit_lr_lr moves a rate by about edit_lr_lr per step. A calibrated MEND
                      editor of layers 27-29 led the uncalibrated one by 0.2 train edit accuracy
                      at step 100 and 0.03 at step 1700 (docs/benchmarks.md).
    calibration_rows: facts scored for each grid value (in batches of batch_size).
    locality_positions: where the locality KL is taken. "all" (the paper's choice, for its NQ
                      locality text): every position of "locality_prompt locality_answer".
                      "answer": only the positions that predict the locality answer's tokens,
                      the ones the `locality` metric scores (rows without an answer: all their
                      positions). On CounterFact's neighbour prompts "answer" buys locality with
                      edit success: the same 1200 further steps of a SmolLM2-135M MEND editor
                      gave 0.41 edit success / 0.88 locality on val single edits with "answer",
                      0.88 / 0.65 with "all" (docs/benchmarks.md).
    lr_schedule:      "constant" (lr and edit_lr_lr throughout) or "cosine" (both decay along a
                      half cosine from their value at the first step to lr_min_ratio times it at `steps`).
                      At a constant 1e-3 a SmolLM2-135M MEND editor kept moving along the edit /
                      locality trade-off: 0.93 / 0.63 edit success / locality on val at step 2000,
                      0.78 / 0.76 at step 2600; cosine from 1e-3 to 1e-4 over 3000 steps ended at
                      0.93 / 0.70 with drawdown 0.086 instead of 0.135 (docs/benchmarks.md). The
                      schedule is a function of the step and `steps`: a run resumed with more
                      steps continues on the longer schedule (its lr jumps back up), so with
                      "cosine" choose `steps` up front. "constant" (the default) extends freely.
    lr_min_ratio:     the cosine schedule's final lr as a share of the initial one.
    key_stats_rows:   training facts whose texts (`key_texts`) estimate the key second moments
                      of an editor with MendNetConfig.whiten_keys, before the first step.
    select_by:        "" keeps the editor of the last step; a validation metric (one of
                      SELECTION_METRICS: loss, edit_nll, locality_kl lowest; edit_accuracy,
                      locality_agreement highest) keeps the editor of the validation with the
                      best value instead (needs validation rows; the last one is kept too).
    """

    steps: int = 500
    batch_size: int = 4
    lr: float = 1e-3
    edit_lr_lr: float = 1e-3
    c_edit: float = 0.1
    c_loc: float = 1.0
    grad_clip: float = 100.0
    checkpoint_every: int = 50
    val_every: int = 100
    val_rows: int = 20
    seed: int = 0
    edit_lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
    calibration_rows: int = 20
    locality_positions: str = "all"
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.1
    select_by: str = ""
    key_stats_rows: int = 400

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, not {self.lr_schedule!r}")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"lr_min_ratio must be in [0, 1], not {self.lr_min_ratio}")
        if self.select_by and self.select_by not in SELECTION_METRICS:
            raise ValueError(f"select_by must be '' (the last step) or one of {sorted(SELECTION_METRICS)}, not {self.select_by!r}")
        if self.locality_positions not in LOCALITY_POSITIONS:
            raise ValueError(f"locality_positions must be one of {LOCALITY_POSITIONS}, not {self.locality_positions!r}")
        object.__setattr__(self, "edit_lr_grid", tuple(float(x) for x in self.edit_lr_grid))  # lists from JSON / YAML
        if any(x <= 0 for x in self.edit_lr_grid) or self.calibration_rows < 1:
            raise ValueError("edit_lr_grid values must be > 0 and calibration_rows >= 1")
        if min(self.steps, self.batch_size, self.checkpoint_every, self.val_rows, self.key_stats_rows) < 1:
            raise ValueError("steps, batch_size, checkpoint_every, val_rows and key_stats_rows must be >= 1")
        if self.lr <= 0 or self.edit_lr_lr < 0 or self.c_edit < 0 or self.c_loc < 0 or self.grad_clip < 0 or self.val_every < 0:
            raise ValueError("lr must be > 0; edit_lr_lr, c_edit, c_loc, grad_clip and val_every >= 0")


@dataclass(frozen=True)
class MendConfig:
    """Applying a trained MEND editor (Algorithm 2).

    editor:     directory of a trained editor (editor.json + editor.safetensors), as written by
                `editflow train-editor`; it fixes the edited layers and roles.
    batch_size: requests per forward+backward pass (the update sums over all of them).
    check_base: refuse a model whose edited weights differ from the ones the editor was trained
                on (an editor learns one model's gradients); off, a mismatch only warns.
    progress:   show a progress bar.
    edit_scale: multiplies every learned edit rate eta_l when applying: the edit's strength,
                chosen at deployment without retraining. Above 1 buys edit success and
                paraphrase with locality and drawdown, below 1 the reverse; 1 applies the editor
                as trained. The whitened SmolLM2-135M MEND editor on 100 CounterFact val rows
                (edit success / paraphrase / locality / drawdown): 0.7 -> 0.81 / 0.50 / 0.90 /
                0.07, 1 -> 0.95 / 0.76 / 0.84 / 0.09, 1.5 -> 1.00 / 0.98 / 0.75 / 0.14
                (docs/benchmarks.md). It is also how two editors are compared at equal edit
                success, as FT is by its steps (benchmarks/mend_salem.py, `--methods
                "salem:edit_scale=0.8"`).
    """

    editor: str = ""
    batch_size: int = 16
    check_base: bool = False
    progress: bool = False
    edit_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not self.edit_scale > 0:
            raise ValueError(f"edit_scale must be > 0, got {self.edit_scale}")


# ---------------------------------------------------------------------------------------
# the editor network
# ---------------------------------------------------------------------------------------


class RunningNorm(nn.Module):
    """Per-dimension running mean and variance of the inputs seen in training (Chan et al.'s
    parallel update), used to normalise the editor's inputs. Untrained: mean 0, std 1."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:  # z: (N, dim)
        n = z.shape[0]
        if n == 0:
            return
        z = z.double()
        batch_mean = z.mean(0)
        batch_m2 = ((z - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count.fill_(total)

    def stats(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2:
            return torch.zeros_like(self.mean, dtype=dtype), torch.ones_like(self.mean, dtype=dtype)
        std = (self.m2 / (self.count - 1) + self.eps).sqrt()
        return self.mean.to(dtype), std.to(dtype)


class ResidualBlock(nn.Module):
    """h = z + scale_l * U act(V z + b) + offset_l, with U zero-initialised (identity at start)."""

    def __init__(self, dim: int, rank: int, num_layers: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)  # V, b
        self.up = nn.Parameter(torch.zeros(dim, rank))  # U
        self.scale = nn.Parameter(torch.ones(num_layers, dim))
        self.offset = nn.Parameter(torch.zeros(num_layers, dim))

    def forward(self, z: torch.Tensor, layer: int) -> torch.Tensor:  # z: (N, dim)
        hidden = torch.relu(self.down(z))  # (N, rank)
        return z + self.scale[layer] * (hidden @ self.up.T) + self.offset[layer]


class ShapeEditor(nn.Module):
    """g for every edited weight of one (in, out) shape: normalise, residual blocks, un-normalise."""

    def __init__(self, dim_in: int, dim_out: int, num_layers: int, config: MendNetConfig):
        super().__init__()
        self.dim_in = dim_in
        self.norm = RunningNorm(dim_in + dim_out, config.norm_eps)
        self.blocks = nn.ModuleList(ResidualBlock(dim_in + dim_out, config.rank, num_layers) for _ in range(config.blocks))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, in), (N, out) -> (N, in), (N, out); updates the running statistics in training."""
        z = torch.cat([u, delta], dim=-1).float()
        if self.training:
            self.norm.update(z)
        mean, std = self.norm.stats(z.dtype)
        h = (z - mean) / std
        for block in self.blocks:
            h = block(h, layer)
        out = mean + std * h
        return out[:, : self.dim_in], out[:, self.dim_in :]


@dataclass
class Factors:
    """The factors of one weight's update, in (out, in) orientation: delta_W = left @ right.
    left: (out, K); right: (K, in)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.right.shape[0]


def _shape_key(dim_in: int, dim_out: int) -> str:
    return f"{dim_in}x{dim_out}"


class MendNet(nn.Module):
    """All shape editors of one model plus the per-weight edit rates.

    `targets` names the edited weights in order, as (parameter name, in, out); weight i uses the
    shape editor of its shape with layer slot = its index among the weights of that shape."""

    def __init__(self, config: MendNetConfig, targets: Sequence[tuple[str, int, int]]):
        super().__init__()
        self.config = config
        self.targets = [tuple(t) for t in targets]
        slots: dict[str, int] = {}
        self.slot: dict[str, tuple[str, int]] = {}
        for name, dim_in, dim_out in self.targets:
            key = _shape_key(dim_in, dim_out)
            self.slot[name] = (key, slots.get(key, 0))
            slots[key] = slots.get(key, 0) + 1
        dims = {_shape_key(i, o): (i, o) for _, i, o in self.targets}
        self.editors = nn.ModuleDict({key: ShapeEditor(*dims[key], slots[key], config) for key in slots})
        self.edit_lrs = nn.Parameter(torch.full((len(self.targets),), config.edit_lr_init))
        if config.whiten_keys:  # (in, in) per weight, the identity until set_key_preconditioners
            for index, (_, dim_in, _) in enumerate(self.targets):
                self.register_buffer(f"key_preconditioner_{index}", torch.eye(dim_in))

    @property
    def param_names(self) -> list[str]:
        return [name for name, _, _ in self.targets]

    def forward(self, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], edit_scale: float = 1.0) -> dict[str, Factors]:
        """(u, delta) pairs per edited weight -> the factors of each weight's update, with every
        edit rate multiplied by `edit_scale` (MendConfig.edit_scale)."""
        factors = {}
        for index, name in enumerate(self.param_names):
            u, delta = pairs[name]
            key, slot = self.slot[name]
            u_new, delta_new = self.editors[key](u, delta, slot)
            if self.config.whiten_keys:
                u_new = u_new @ self.key_preconditioner(index)  # (N, in); the preconditioner is symmetric
            factors[name] = Factors(left=-(edit_scale * self.edit_lrs[index]) * delta_new.T, right=u_new)
        return factors

    def key_preconditioner(self, index: int) -> torch.Tensor:
        """(C / s + damping I)^-1 of edited weight `index` (MendNetConfig.whiten_keys)."""
        return self.get_buffer(f"key_preconditioner_{index}")


def parameter_groups(net: MendNet, train: MendTrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: the editor's weights at `lr`, the per-layer edit rates at `edit_lr_lr`."""
    others = [p for name, p in net.named_parameters() if name != "edit_lrs"]
    return [{"params": others, "lr": train.lr}, {"params": [net.edit_lrs], "lr": train.edit_lr_lr}]


def lr_factor(train: MendTrainConfig, step: int) -> float:
    """The share of its initial lr every optimizer group uses at `step` (1-based)."""
    if train.lr_schedule == "constant":
        return 1.0
    progress = min(max(step - 1, 0) / max(train.steps - 1, 1), 1.0)  # 0 at the first step, 1 at the last
    return train.lr_min_ratio + (1 - train.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` of a validation metric in SELECTION_METRICS beats `best` (None: nothing yet)."""
    if best is None:
        return True
    return value > best if SELECTION_METRICS[metric] else value < best


def calibrate_edit_rates(net: MendNet, loaded: LoadedModel, batches: Sequence["TrainingBatch"],
                         train: MendTrainConfig) -> list[dict[str, float]]:
    """Set each edited layer's edit rate (all its weights share one) to the value of
    `train.edit_lr_grid` with the lowest mean MEND loss over `batches`, one layer after another
    with the others held. Meant for an untrained net, whose edit is the plain gradient step.
    Returns one record per layer slot and grid value: slot, edit_lr and the mean loss parts
    of `mend_loss` (loss, edit_nll, locality_kl, edit_accuracy)."""
    per_layer = len(net.config.roles)  # targets are layer-major: the weights of slot i are i*R .. i*R+R-1
    records: list[dict[str, float]] = []
    was_training = net.training
    net.eval()  # the running statistics must not learn from the search
    try:
        for slot in range(len(net.targets) // per_layer):
            weights = slice(slot * per_layer, (slot + 1) * per_layer)
            losses = {}
            for rate in train.edit_lr_grid:
                with torch.no_grad():  # the model's gradient is taken inside token_pairs all the same
                    net.edit_lrs[weights] = rate
                    parts = [mend_loss(net, loaded, b, train)[1] for b in batches]
                means = {key: sum(p[key] for p in parts) / len(parts) for key in parts[0]}
                losses[rate] = means["loss"]
                records.append({"slot": slot, "edit_lr": rate, **means})
            with torch.no_grad():
                net.edit_lrs[weights] = min(losses, key=losses.__getitem__)
    finally:
        net.train(was_training)
    return records


def net_targets(loaded: LoadedModel, config: MendNetConfig) -> list[tuple[str, int, int]]:
    """(parameter name, in, out) of every weight the editor edits, layer by layer."""
    adapter = loaded.adapter
    targets = []
    for layer in adapter.resolve_layers(config.layers):
        for role in config.roles:
            dim_out, dim_in = adapter.as_out_in(adapter.weight(role, layer)).shape
            targets.append((adapter.param_name(role, layer), dim_in, dim_out))
    return targets


def build_net(loaded: LoadedModel, config: MendNetConfig, seed: int = 0) -> MendNet:
    """A fresh (identity) editor network for `loaded`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MendNet(config, net_targets(loaded, config))


# ---------------------------------------------------------------------------------------
# saving and loading a trained editor
# ---------------------------------------------------------------------------------------


class EditorFileError(ValueError):
    """A trained-editor directory that cannot be read or does not fit the model."""


def save_net(net: MendNet, directory: str | Path, info: Mapping[str, Any]) -> Path:
    """Write editor.safetensors + editor.json (net config, targets and `info`: base model,
    its weights hash, training config and metrics)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = directory / (NET_WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(directory / NET_WEIGHTS_NAME)
    document = {"net": config_to_dict(net.config), "targets": [list(t) for t in net.targets], **info}
    tmp = directory / (NET_CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(document, indent=2), encoding="utf-8")
    tmp.replace(directory / NET_CONFIG_NAME)
    return directory


def load_net(directory: str | Path) -> tuple[MendNet, dict[str, Any]]:
    """A saved editor and its editor.json document."""
    directory = Path(directory)
    config_path = directory / NET_CONFIG_NAME
    if not config_path.is_file() or not (directory / NET_WEIGHTS_NAME).is_file():
        raise EditorFileError(f"{directory} is not a trained MEND editor: {NET_CONFIG_NAME} and {NET_WEIGHTS_NAME} are needed")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
        config = load_config(MendNetConfig, document["net"])
        net = MendNet(config, document["targets"])
        net.load_state_dict(load_file(str(directory / NET_WEIGHTS_NAME)))
    except (KeyError, json.JSONDecodeError, RuntimeError) as exc:
        raise EditorFileError(f"{directory}: cannot read the editor: {exc}") from None
    net.eval()
    return net, document


# ---------------------------------------------------------------------------------------
# gradient factors: (u, delta) pairs of the unedited model
# ---------------------------------------------------------------------------------------


@contextmanager
def _captured_io(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Inside the block, each named module's last (input, output) is recorded; hooks removed on exit."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, module in modules.items():
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> None:
            seen[name] = (args[0], output)
        handles.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The token rows of a (B, T, d) or flattened (B*T, d) activation where `keep` (B, T) is set."""
    return x[keep] if x.dim() == 3 else x[keep.reshape(-1)]


def _modules_of(loaded: LoadedModel, names: Sequence[str]) -> dict[str, nn.Module]:
    return {name: loaded.model.get_submodule(name.rsplit(".", 1)[0]) for name in names}


def token_pairs(loaded: LoadedModel, batch: CompletionBatch, names: Sequence[str],
                keep: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per edited weight, the (u, delta) pairs of the batch's tokens where `keep` (B, T) is set
    (default: every real token): (N, in), (N, out).

    The loss is the SUM over rows of each row's mean target NLL, so the pairs of a batch are the
    pairs of its rows put together. Over every real token, sum_t delta_t u_t^T equals the
    weight's gradient (out, in)."""
    params = [loaded.model.get_parameter(n) for n in names]
    before = [p.requires_grad for p in params]
    keep = batch.attention_mask.bool() if keep is None else keep
    try:
        for p in params:  # so the edited layers' outputs carry a gradient
            p.requires_grad_(True)
        with torch.enable_grad(), _captured_io(_modules_of(loaded, names)) as seen:
            logits = completion_logits(loaded.model, batch)
            loss = completion_nll(logits, batch).sum()
            outputs = [seen[n][1] for n in names]
            grads = torch.autograd.grad(loss, outputs)
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
    return {n: (_rows(seen[n][0], keep).detach(), _rows(g, keep).detach()) for n, g in zip(names, grads)}


def key_texts(requests: Sequence[EditRequest]) -> list[str]:
    """Texts whose layer inputs estimate the key second moments: each request's prompt with its
    old answer (when known) and its locality prompt with its answer: ordinary text of the
    facts' domain, not the new targets."""
    texts = []
    for r in requests:
        texts.append(f"{r.prompt} {r.ground_truth}" if r.ground_truth else r.prompt)
        if r.locality_prompt:
            texts.append(f"{r.locality_prompt} {r.locality_answer}" if r.locality_answer else r.locality_prompt)
    return texts


@torch.no_grad()
def key_second_moments(loaded: LoadedModel, names: Sequence[str], texts: Sequence[str], batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per edited weight, C = E[u u^T] (in, in) over every real token of `texts`."""
    if not texts:
        raise ValueError("key second moments need at least one text")
    device = next(loaded.model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    with _captured_io(_modules_of(loaded, names)) as seen:
        for start in range(0, len(texts), batch_size):
            batch = text_batch(loaded.tokenizer, list(texts[start : start + batch_size])).to(device)
            loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            keep = batch.attention_mask.bool()
            for name in names:
                u = _rows(seen[name][0], keep).double()  # (N, in)
                sums[name] = sums[name] + u.T @ u if name in sums else u.T @ u
            tokens += int(keep.sum())
    return {name: total / tokens for name, total in sums.items()}


def set_key_preconditioners(net: MendNet, moments: Mapping[str, torch.Tensor]) -> None:
    """Set each edited weight's key preconditioner to (C / s + damping I)^-1, s = trace(C) / in."""
    if not net.config.whiten_keys:
        raise ValueError("this editor does not whiten keys (MendNetConfig.whiten_keys is off)")
    for index, name in enumerate(net.param_names):
        moment = moments[name].double()
        dim = moment.shape[0]
        scale = moment.trace() / dim
        eye = torch.eye(dim, dtype=moment.dtype, device=moment.device)
        inverse = torch.linalg.inv(moment / scale + net.config.whiten_damping * eye)
        buffer = net.key_preconditioner(index)
        buffer.copy_(((inverse + inverse.T) / 2).to(buffer))  # symmetric to the last bit


def low_rank_pairs(u: torch.Tensor, delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`rank` singular pairs of G = delta^T u (out x in) without forming G:
    (k, in), (k, out) with sum_i delta_i u_i^T the best rank-k approximation of G (k <= rank)."""
    q_delta, r_delta = torch.linalg.qr(delta.T.double())  # (out, N), (N, N)
    q_u, r_u = torch.linalg.qr(u.T.double())  # (in, N), (N, N)
    core_u, sigma, core_vh = torch.linalg.svd(r_delta @ r_u.T)  # G = q_delta core q_u^T
    k = min(rank, int((sigma > sigma[0] * 1e-7).sum()) if sigma.numel() and sigma[0] > 0 else 0)
    root = sigma[:k].sqrt()
    a = (q_delta @ core_u[:, :k]) * root  # (out, k)
    b = (q_u @ core_vh[:k].T) * root  # (in, k)
    return b.T.to(u.dtype), a.T.to(delta.dtype)


def subject_mask(tokenizer: Any, batch: CompletionBatch, requests: Sequence[EditRequest]) -> torch.Tensor:
    """(B, T) bool: the last token of each request's subject in its prompt (the batch's rows)."""
    mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    for row, request in enumerate(requests):
        at = subject_last_token(tokenizer, request.prompt, request.subject or "")
        if at is None:
            where = request.source or request.prompt
            raise ValueError(f"{where}: field 'subject' ({request.subject!r}) must occur in the prompt "
                             f"({request.prompt!r}) for an editor with pair_positions 'subject'")
        mask[row, at] = True
    return mask


def editor_inputs(loaded: LoadedModel, batch: CompletionBatch, requests: Sequence[EditRequest], names: Sequence[str],
                  config: MendNetConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What the editor sees of an edit batch (one row per request): its token pairs at
    `config.pair_positions` (MEND) or their top singular pairs (SaLEM)."""
    keep = subject_mask(loaded.tokenizer, batch, requests) if config.pair_positions == "subject" else None
    pairs = token_pairs(loaded, batch, names, keep)
    if config.factors == "svd":
        return {n: low_rank_pairs(u, d, config.svd_rank) for n, (u, d) in pairs.items()}
    return pairs


def edit_pairs(loaded: LoadedModel, requests: Sequence[EditRequest], config: MendNetConfig,
               names: Sequence[str], batch_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The editor's input pairs for `requests`: token pairs (MEND), or the top singular pairs of
    the gradient summed over each group of `svd_group` requests (SaLEM)."""
    device = next(loaded.model.parameters()).device
    step = config.svd_group if config.factors == "svd" else batch_size
    chunks: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for start in range(0, len(requests), step):
        group = requests[start : start + step]
        batch = completion_batch(loaded.tokenizer, [(r.prompt, r.target_new) for r in group]).to(device)
        chunks.append(editor_inputs(loaded, batch, group, names, config))
    return {n: (torch.cat([c[n][0] for c in chunks]), torch.cat([c[n][1] for c in chunks])) for n in names}


# ---------------------------------------------------------------------------------------
# the edited forward (training) and the edit artifact (applying)
# ---------------------------------------------------------------------------------------


@contextmanager
def edited_forward(loaded: LoadedModel, factors: Mapping[str, Factors]) -> Iterator[None]:
    """Inside the block every edited layer computes W~ x = W x + left (right x), differentiable
    in the factors; hooks removed on exit. The weights themselves are never touched."""
    handles = []
    for name, module in _modules_of(loaded, list(factors)).items():
        f = factors[name]

        def hook(_module: nn.Module, args: tuple, output: torch.Tensor, f: Factors = f) -> torch.Tensor:
            x = args[0]  # (..., in)
            return output + ((x.to(f.right.dtype) @ f.right.T) @ f.left.T).to(output.dtype)

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def weight_deltas(loaded: LoadedModel, factors: Mapping[str, Factors]) -> dict[str, WeightDelta]:
    """The factors as low-rank WeightDeltas in each parameter's storage orientation."""
    deltas = {}
    for name, f in factors.items():
        left, right = f.left.detach(), f.right.detach()
        if loaded.adapter.arch.conv1d:  # stored (in, out): (left right)^T = right^T left^T
            left, right = right.T, left.T
        param = loaded.model.get_parameter(name)
        deltas[name] = WeightDelta(left=left.to(param.dtype).contiguous(), right=right.to(param.dtype).contiguous())
    return deltas


@dataclass
class TrainingBatch:
    """One step of editor training (Algorithm 1), built by `training_batch`.

    edit:       prompt -> target_new of each request (the edit's gradient comes from here).
    equivalent: prompt and rephrases -> target_new (must be right after the edit).
    locality:   locality texts and the unedited model's next-token log-probs on them.
    locality_mask: (B, T) bool, the locality positions whose KL the loss takes.
    """

    requests: list[EditRequest]
    edit: CompletionBatch
    equivalent: CompletionBatch
    locality: CompletionBatch
    locality_reference: torch.Tensor
    locality_mask: torch.Tensor


def _locality_batch(tokenizer: Any, requests: Sequence[EditRequest], positions: str) -> tuple[CompletionBatch, torch.Tensor]:
    """The locality texts and the positions of their KL (see MendTrainConfig.locality_positions)."""
    if positions == "all":
        texts = [f"{r.locality_prompt} {r.locality_answer}" if r.locality_answer else r.locality_prompt for r in requests]
        batch = text_batch(tokenizer, texts)
        return batch, batch.attention_mask.bool()
    # answered rows: prompt -> answer, KL where the answer is predicted; the others: every position
    rows = [completion_ids(tokenizer, r.locality_prompt, r.locality_answer) if r.locality_answer
            else (tokenizer(r.locality_prompt, add_special_tokens=True)["input_ids"], []) for r in requests]
    batch = pad_completions(rows, tokenizer.pad_token_id)
    unanswered = torch.tensor([not r.locality_answer for r in requests])[:, None]
    return batch, batch.target_mask | (unanswered & batch.attention_mask.bool())


def training_batch(loaded: LoadedModel, requests: Sequence[EditRequest],
                   locality_positions: str = MendTrainConfig.locality_positions) -> TrainingBatch:
    """Tokenise one training step's requests; every request needs a locality_prompt."""
    missing = [r.source or r.prompt for r in requests if not r.locality_prompt]
    if missing:
        raise ValueError(f"MEND training needs a locality_prompt on every request; missing for {missing[:5]}")
    device = next(loaded.model.parameters()).device
    tokenizer = loaded.tokenizer
    edit = completion_batch(tokenizer, [(r.prompt, r.target_new) for r in requests]).to(device)
    equivalent = completion_batch(tokenizer, [(p, r.target_new) for r in requests for p in (r.prompt, *r.rephrase)]).to(device)
    locality, mask = _locality_batch(tokenizer, requests, locality_positions)
    locality = locality.to(device)
    with torch.no_grad():
        reference = completion_logits(loaded.model, locality).float().log_softmax(-1)
    return TrainingBatch(list(requests), edit, equivalent, locality, reference, mask.to(device))


def training_batches(loaded: LoadedModel, requests: Sequence[EditRequest], train: MendTrainConfig) -> list[TrainingBatch]:
    """`requests` in consecutive training batches of `train.batch_size`."""
    size = train.batch_size
    return [training_batch(loaded, requests[i : i + size], train.locality_positions) for i in range(0, len(requests), size)]


def mend_loss(net: MendNet, loaded: LoadedModel, batch: TrainingBatch, train: MendTrainConfig,
              call: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Algorithm 1 for one batch: edit with the editor, score the edited model. `call` runs the
    editor when it is wrapped (a DeepSpeed engine or DDP around `net`); default `net` itself.

    Returns the loss (differentiable in the editor only) and its parts: edit_nll (mean NLL of
    target_new on prompt + rephrases after the edit), locality_kl, edit_accuracy (share of those
    rows whose every target token is the argmax), locality_agreement (share of the KL's locality
    positions whose argmax the edit left unchanged)."""
    names = net.param_names
    pairs = editor_inputs(loaded, batch.edit, batch.requests, names, net.config)
    factors = (call or net)(pairs)
    with edited_forward(loaded, factors):
        logits = completion_logits(loaded.model, batch.equivalent)
        nll = completion_nll(logits, batch.equivalent)  # (rows,)
        locality_logits = completion_logits(loaded.model, batch.locality)
        kl = kl_from_reference(locality_logits, batch.locality_reference, batch.locality_mask)
    with torch.no_grad():
        hit = (logits.argmax(-1) == batch.equivalent.targets) | ~batch.equivalent.target_mask
        accuracy = hit.all(-1).float().mean().item()
        same = locality_logits.argmax(-1) == batch.locality_reference.argmax(-1)  # (B, T)
        agreement = (same & batch.locality_mask).sum().item() / max(batch.locality_mask.sum().item(), 1)
    loss = train.c_edit * nll.mean() + train.c_loc * kl
    return loss, {"loss": loss.item(), "edit_nll": nll.mean().item(), "locality_kl": kl.item(), "edit_accuracy": accuracy,
                  "locality_agreement": agreement}


# ---------------------------------------------------------------------------------------
# the registered editor
# ---------------------------------------------------------------------------------------


@register_editor
class MendEditor(Editor):
    """Applies a trained MEND editor network (see the module docstring)."""

    name = "mend"
    config_class = MendConfig
    config: MendConfig
    expected_factors: str | None = "tokens"

    def __init__(self, config: MendConfig | None = None):
        super().__init__(config)
        self._net: MendNet | None = None
        self._document: dict[str, Any] = {}

    def net(self) -> tuple[MendNet, dict[str, Any]]:
        """The trained editor named by the config (loaded once)."""
        if self._net is None:
            if not self.config.editor:
                raise ValueError(f"{self.name} needs a trained editor: set `editor` (a directory written by `editflow train-editor`)")
            self._net, self._document = load_net(self.config.editor)
            factors = self._net.config.factors
            if self.expected_factors and factors != self.expected_factors:
                raise EditorFileError(
                    f"{self.config.editor}: this editor was trained with factors={factors!r}; "
                    f"method {self.name} expects {self.expected_factors!r} (use method "
                    f"{'salem' if factors == 'svd' else 'mend'})"
                )
        return self._net, self._document

    def edited_params(self, loaded: LoadedModel) -> list[str]:
        return self.net()[0].param_names

    def check_shapes(self, loaded: LoadedModel, net: MendNet) -> None:
        """Refuse a model whose edited weights do not have the editor's shapes."""
        try:
            actual = net_targets(loaded, net.config)
        except ValueError as exc:
            raise EditorFileError(f"{self.config.editor}: does not fit this model: {exc}") from None
        if [tuple(t) for t in actual] != net.targets:
            raise EditorFileError(
                f"{self.config.editor}: trained for weights {net.targets}, but this model has {actual}"
            )

    def check_weights(self, edited_hash: str, document: Mapping[str, Any]) -> None:
        """Warn (or refuse, with check_base) when the edited weights (`edited_hash`: their
        weights_hash) differ from those of the model the editor was trained on."""
        expected = document.get("base_hash")
        if expected and edited_hash != expected:
            message = (f"{self.config.editor}: trained on {document.get('base_model')!r}; the edited "
                       "weights of this model differ (another model, or edits attached)")
            if self.config.check_base:
                raise EditorFileError(message)
            log.warning(message)

    def factors(self, loaded: LoadedModel, requests: Sequence[EditRequest]) -> dict[str, Factors]:
        """The update factors of the trained editor for `requests` (check the model first:
        `check_shapes`, `check_weights`)."""
        net, _ = self.net()
        device = next(loaded.model.parameters()).device
        net.to(device).eval()
        pairs = edit_pairs(loaded, requests, net.config, net.param_names, self.config.batch_size)
        with torch.no_grad():
            return net(pairs, self.config.edit_scale)

    def edit(self, loaded: LoadedModel, requests: Sequence[EditRequest], parent: EditArtifact | None = None) -> WeightDeltaArtifact:
        if not requests:
            raise ValueError("an edit needs at least one request")
        net, document = self.net()
        self.check_shapes(loaded, net)
        hashed = self.hashed_params(loaded, net.param_names, parent)
        base_hash = weights_hash(loaded.model, hashed)  # hashing is a good part of a MEND edit's time: once
        self.check_weights(base_hash if parent is None else weights_hash(loaded.model, net.param_names), document)
        deltas = weight_deltas(loaded, self.factors(loaded, requests))
        return WeightDeltaArtifact(self._meta(loaded, requests, hashed, base_hash, parent), deltas)

    def sequential(self, loaded: LoadedModel, parent: EditArtifact | None = None) -> FoldingSession:
        return FoldingSession(self, loaded, parent)
