"""SaLEM layer saliency: which layer's weights the edit dataset pulls on hardest.

SaLEM ("salient-layers editing model"; Amazon, EACL 2024; summary at
https://www.amazon.science/blog/updating-large-language-models-by-directly-editing-network-layers;
no public code: this module is the reference implementation here). The layer to edit is the
one whose weights get the largest gradients on the edit dataset.

Edit dataset (`build_samples`), one `Sample(group, prompt, target)` each:
    fail   a fact's prompt -> target_new (what the model must learn)
    adapt  each rephrase of the prompt -> target_new (what it must generalise to)
    pass   prompts the model already answers right, with that answer:
           - by default each fact's locality prompt -> the model's OWN greedy continuation,
             as many tokens as the locality answer has (`LOCALITY_FALLBACK_TOKENS` without
             one), decoded to text. Greedy and teacher-forced predictions agree along that
             path, so the sample's loss is the loss of the model's own argmax path;
           - with `heldout` pairs (prompt, answer): the pairs the model gets fully right
             (every answer token the teacher-forced argmax); the others are dropped.
           Either way a pass sample is kept only if the model predicts its target fully
           right under teacher forcing (a greedy text that does not re-tokenise to the same
           tokens, rare with BPE, is dropped and logged).

Scores (`saliency_sums`). For every sample, L = mean NLL of its target tokens given the prompt
(`completion_nll`; one forward and one backward per sample: per-sample gradients). For each
editable weight W (roles `mlp_in`, `mlp_out`, `attn_out` of every layer by default) and g = dL/dW:
    mean_abs = mean over W's entries of |g|
    fro      = ||g||_F / number of entries of W
`SaliencySums` holds, per group, layer and role, the SUMS over samples of both (float64), the
sample counts and the summed loss, so the sums of disjoint shards add up exactly (Ray).
`SaliencySums.scores()` divides by the counts: a role's score is the mean over samples; a
layer's score is the mean over its roles of their mean_abs scores; the salient layer is the
argmax of the layer scores (ties: the lower layer). The pooled scores (and the salient layer)
use all samples of fail, adapt AND pass, each sample weighing the same, as the paper scores
its whole edit dataset; `scores(groups=...)` pools other groups, and every group is also
reported on its own (`SaliencyScores.by_group`).

The model's weights are never changed; requires_grad is switched on for the scored weights
only during a backward and restored afterwards.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .data.requests import EditRequest
from .evaluate import LOCALITY_FALLBACK_TOKENS, greedy_continuations, teacher_forced
from .models.architectures import ROLES
from .models.loading import LoadedModel
from .plotting import agg_figure
from .tokens import completion_batch, completion_ids, completion_nll

log = logging.getLogger(__name__)

GROUPS = ("fail", "adapt", "pass")
SALIENCY_JSON, SALIENCY_PNG = "saliency.json", "saliency.png"


# ---------------------------------------------------------------------------------------
# config and samples
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaliencyConfig:
    """Layer saliency scoring.

    roles:    the weights scored in every layer (roles of the architecture table: mlp_in,
              mlp_out, attn_out); a layer's score is the mean over these roles.
    progress: show a progress bar over the samples.

    There is no batch size: a per-sample gradient needs its own backward, so every sample is
    one forward and one backward (batch of 1). `build_samples` takes its own `batch_size`
    for the gradient-free passes that find the pass samples.
    """

    roles: tuple[str, ...] = ROLES
    progress: bool = False

    def __post_init__(self) -> None:
        roles = tuple(self.roles)  # a list from JSON / YAML / asdict round trips
        object.__setattr__(self, "roles", roles)
        unknown = [r for r in roles if r not in ROLES]
        if not roles or unknown or len(set(roles)) != len(roles):
            raise ValueError(f"roles must be one or more distinct roles of {list(ROLES)}, got {list(roles)}")


@dataclass(frozen=True)
class Sample:
    """One item of the edit dataset: `prompt` should continue with `target`.

    group: "fail" (prompt -> target_new), "adapt" (rephrase -> target_new) or "pass" (a prompt
           the model already answers right -> that answer).
    """

    group: str
    prompt: str
    target: str

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"sample group must be one of {list(GROUPS)}, got {self.group!r}")


def _require_causal(loaded: LoadedModel) -> None:
    if not loaded.adapter.arch.causal:
        raise ValueError(f"saliency scores completions of a causal language model; {loaded.name} is a "
                         f"{loaded.adapter.model_type} encoder")


def _known_pairs(loaded: LoadedModel, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[tuple[str, str]]:
    """The pairs whose every answer token the model predicts (teacher-forced argmax)."""
    if not pairs:
        return []
    right = teacher_forced(loaded.model, loaded.tokenizer, pairs, batch_size)  # one bool tensor per pair
    return [pair for pair, ok in zip(pairs, right) if bool(ok.all())]


def _own_answers(loaded: LoadedModel, requests: Sequence[EditRequest], batch_size: int) -> list[tuple[str, str]]:
    """(locality prompt, the model's greedy continuation as text) for every request that has a
    locality prompt; the continuation has as many tokens as the locality answer."""
    tok = loaded.tokenizer
    prompts, lengths = [], []
    for r in requests:
        if r.locality_prompt:
            prompts.append(r.locality_prompt)
            answer = r.locality_answer
            lengths.append(len(completion_ids(tok, r.locality_prompt, answer)[1]) if answer else LOCALITY_FALLBACK_TOKENS)
    if not prompts:
        return []
    ids = greedy_continuations(loaded.model, tok, prompts, lengths, batch_size)
    # special tokens stay in the text (an end-of-text prediction is a prediction): they
    # tokenise back to themselves
    texts = [tok.decode(seq, skip_special_tokens=False) for seq in ids]
    return [(p, t) for p, t in zip(prompts, texts) if t.strip()]


def build_samples(loaded: LoadedModel, requests: Sequence[EditRequest],
                  heldout: Sequence[tuple[str, str]] | None = None, batch_size: int = 16) -> list[Sample]:
    """The SaLEM edit dataset of `requests`: fail, adapt and pass samples, in that order.

    Pass samples come from `heldout` (prompt, answer) pairs the model gets right when given,
    else from the requests' locality prompts with the model's own greedy answers (see the
    module docstring). `batch_size`: prompts per gradient-free forward."""
    _require_causal(loaded)
    samples = [Sample("fail", r.prompt, r.target_new) for r in requests]
    samples += [Sample("adapt", p, r.target_new) for r in requests for p in r.rephrase]
    candidates = list(heldout) if heldout is not None else _own_answers(loaded, requests, batch_size)
    known = _known_pairs(loaded, candidates, batch_size)
    wanted = len(heldout) if heldout is not None else sum(bool(r.locality_prompt) for r in requests)
    if len(known) < wanted:
        source = "held-out pairs" if heldout is not None else "locality prompts"
        log.info("pass samples: %d of %d %s kept (the model must predict them fully)", len(known), wanted, source)
    samples += [Sample("pass", p, a) for p, a in known]
    return samples


def count_groups(samples: Sequence[Sample]) -> dict[str, int]:
    """{group: number of samples} for every group (zeros included)."""
    return {g: sum(s.group == g for s in samples) for g in GROUPS}


# ---------------------------------------------------------------------------------------
# sums and scores
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaliencyScores:
    """Saliency over the samples of `groups`, each sample weighing the same.

    roles:       the scored roles (columns of the role tables).
    groups:      the groups pooled into these scores.
    counts:      samples per group, of every group (not only the pooled ones).
    role_scores: (L, R) float64: mean over samples of mean |dL/dW| of each layer's role.
    role_fro:    (L, R) float64: mean over samples of ||dL/dW||_F / entries of W.
    layer_scores: (L,) the mean of each layer's role_scores: what picks the layer.
    layer_fro:   (L,) the mean of each layer's role_fro.
    mean_nll:    mean over samples of the target tokens' mean NLL.
    by_group:    the same scores over each group alone (groups with samples only).
    """

    roles: tuple[str, ...]
    groups: tuple[str, ...]
    counts: dict[str, int]
    role_scores: torch.Tensor
    role_fro: torch.Tensor
    mean_nll: float
    by_group: dict[str, "SaliencyScores"] = field(default_factory=dict)

    @property
    def layer_scores(self) -> torch.Tensor:
        return self.role_scores.mean(1)

    @property
    def layer_fro(self) -> torch.Tensor:
        return self.role_fro.mean(1)

    @property
    def chosen_layer(self) -> int:
        """The argmax of the layer scores; the lowest layer among ties."""
        return self.chosen_among(range(len(self.layer_scores)))

    def chosen_among(self, layers: Iterable[int]) -> int:
        """The most salient of `layers` (non-negative indices); the lowest among ties."""
        values = self.layer_scores.tolist()
        return max(layers, key=lambda i: (values[i], -i))

    @property
    def samples(self) -> int:
        return sum(self.counts[g] for g in self.groups)

    def to_json(self) -> dict[str, Any]:
        """Plain data: scores per layer, per role (by role name) and per group."""
        document: dict[str, Any] = {
            "groups": list(self.groups), "samples": self.samples, "chosen_layer": self.chosen_layer,
            "mean_nll": self.mean_nll,
            "layer_scores": self.layer_scores.tolist(), "layer_fro": self.layer_fro.tolist(),
            "role_scores": {role: self.role_scores[:, r].tolist() for r, role in enumerate(self.roles)},
            "role_fro": {role: self.role_fro[:, r].tolist() for r, role in enumerate(self.roles)},
        }
        if self.by_group:
            document["counts"] = dict(self.counts)
            document["by_group"] = {g: s.to_json() for g, s in self.by_group.items()}
        return document


@dataclass(frozen=True)
class SaliencySums:
    """Sums over samples, per group; add the sums of disjoint shards to get the whole.

    roles:   the scored roles, in column order.
    abs_sum: (G, L, R) float64: per group (GROUPS order), layer and role, the sum over samples
             of mean |dL/dW|.
    fro_sum: (G, L, R) float64: the sum over samples of ||dL/dW||_F / entries of W.
    nll_sum: (G,) float64: the sum over samples of the loss (mean target-token NLL).
    counts:  (G,) int64: samples per group.
    """

    roles: tuple[str, ...]
    abs_sum: torch.Tensor
    fro_sum: torch.Tensor
    nll_sum: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def zeros(cls, layers: int, roles: Sequence[str]) -> "SaliencySums":
        shape = (len(GROUPS), layers, len(roles))
        f64 = torch.float64
        return cls(tuple(roles), torch.zeros(shape, dtype=f64), torch.zeros(shape, dtype=f64),
                   torch.zeros(len(GROUPS), dtype=f64), torch.zeros(len(GROUPS), dtype=torch.int64))

    @property
    def num_layers(self) -> int:
        return self.abs_sum.shape[1]

    def count(self, group: str) -> int:
        return int(self.counts[GROUPS.index(group)])

    def __add__(self, other: "SaliencySums") -> "SaliencySums":
        if not isinstance(other, SaliencySums):
            return NotImplemented
        if self.roles != other.roles or self.abs_sum.shape != other.abs_sum.shape:
            raise ValueError(f"cannot add saliency sums of roles {list(self.roles)}, shape {tuple(self.abs_sum.shape)} "
                             f"and roles {list(other.roles)}, shape {tuple(other.abs_sum.shape)} (different models or configs?)")
        return SaliencySums(self.roles, self.abs_sum + other.abs_sum, self.fro_sum + other.fro_sum,
                            self.nll_sum + other.nll_sum, self.counts + other.counts)

    def __radd__(self, other: Any) -> "SaliencySums":
        return self if isinstance(other, int) and other == 0 else self.__add__(other)  # sum(parts)

    @classmethod
    def reduce(cls, parts: Sequence["SaliencySums"]) -> "SaliencySums":
        """The sums of several shards added up (at least one)."""
        if not parts:
            raise ValueError("nothing to reduce: no saliency sums given")
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def _pooled(self, groups: Sequence[str]) -> SaliencyScores:
        index = [GROUPS.index(g) for g in groups]
        n = int(self.counts[index].sum())
        if n == 0:
            raise ValueError(f"no samples in group(s) {list(groups)}: nothing to score")
        return SaliencyScores(
            roles=self.roles, groups=tuple(groups), counts={g: self.count(g) for g in GROUPS},
            role_scores=self.abs_sum[index].sum(0) / n, role_fro=self.fro_sum[index].sum(0) / n,
            mean_nll=float(self.nll_sum[index].sum()) / n,
        )

    def scores(self, groups: Sequence[str] = GROUPS) -> SaliencyScores:
        """Means over the samples of `groups` (default: all), with every group with samples
        also scored alone in `by_group`."""
        unknown = [g for g in groups if g not in GROUPS]
        if unknown or not groups:
            raise ValueError(f"groups must be one or more of {list(GROUPS)}, got {list(groups)}")
        pooled = self._pooled(tuple(dict.fromkeys(groups)))
        by_group = {g: self._pooled((g,)) for g in GROUPS if self.count(g)}
        return SaliencyScores(pooled.roles, pooled.groups, pooled.counts, pooled.role_scores, pooled.role_fro,
                              pooled.mean_nll, by_group)

    def to_json(self) -> dict[str, Any]:
        """Plain data (lists and numbers), e.g. to save next to the scores and reduce later."""
        return {
            "roles": list(self.roles), "groups": list(GROUPS),
            "abs_sum": self.abs_sum.tolist(), "fro_sum": self.fro_sum.tolist(),
            "nll_sum": self.nll_sum.tolist(), "counts": self.counts.tolist(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SaliencySums":
        if list(data.get("groups", GROUPS)) != list(GROUPS):
            raise ValueError(f"saliency sums with groups {data.get('groups')}; expected {list(GROUPS)}")
        f64 = torch.float64
        return cls(tuple(data["roles"]), torch.tensor(data["abs_sum"], dtype=f64), torch.tensor(data["fro_sum"], dtype=f64),
                   torch.tensor(data["nll_sum"], dtype=f64), torch.tensor(data["counts"], dtype=torch.int64))


def salient_layer(sums: SaliencySums, groups: Sequence[str] = GROUPS) -> int:
    """The layer with the largest saliency over the samples of `groups` (default: all)."""
    return sums.scores(groups).chosen_layer


# ---------------------------------------------------------------------------------------
# per-sample gradients
# ---------------------------------------------------------------------------------------


@contextmanager
def _requiring_grad(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """requires_grad on for `params` inside the block, restored on exit (also on error)."""
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def editable_weights(loaded: LoadedModel, roles: Sequence[str]) -> list[torch.nn.Parameter]:
    """The scored weights, layer-major: [layer 0 role 0, layer 0 role 1, ..., layer L-1 role R-1]."""
    adapter = loaded.adapter
    return [adapter.weight(role, layer) for layer in range(adapter.num_layers) for role in roles]


def sample_gradients(loaded: LoadedModel, sample: Sample,
                     params: Sequence[torch.nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(loss, [dloss/dW for W in params]) of one sample; loss = mean NLL of its target tokens."""
    device = params[0].device
    batch = completion_batch(loaded.tokenizer, [(sample.prompt, sample.target)]).to(device)  # (1, T)
    with torch.enable_grad(), _requiring_grad(params):
        logits = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        loss = completion_nll(logits, batch)[0]  # scalar
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def saliency_sums(loaded: LoadedModel, samples: Sequence[Sample], config: SaliencyConfig | None = None) -> SaliencySums:
    """Saliency sums over `samples` (all of them: a shard), one backward per sample."""
    config = config or SaliencyConfig()
    _require_causal(loaded)
    layers, roles = loaded.adapter.num_layers, config.roles
    params = editable_weights(loaded, roles)
    sums = SaliencySums.zeros(layers, roles)
    for sample in tqdm(samples, desc="saliency", unit="sample", disable=not config.progress):
        loss, grads = sample_gradients(loaded, sample, params)
        g = GROUPS.index(sample.group)
        for i, grad in enumerate(grads):
            layer, r = divmod(i, len(roles))
            grad = grad.detach()  # the weight's shape; reduced in float64
            sums.abs_sum[g, layer, r] += float(grad.abs().sum(dtype=torch.float64)) / grad.numel()
            sums.fro_sum[g, layer, r] += float(torch.linalg.vector_norm(grad, dtype=torch.float64)) / grad.numel()
        sums.nll_sum[g] += float(loss.double())
        sums.counts[g] += 1
    return sums


# ---------------------------------------------------------------------------------------
# plot (matplotlib is imported when a plot is drawn)
# ---------------------------------------------------------------------------------------


def plot_saliency(scores: SaliencyScores, path: str | Path, title: str = "layer saliency") -> Path:
    """PNG: top, each layer's role scores as grouped bars with the layer score as a line;
    bottom, the layer score of each group alone. The chosen layer is shaded in both."""
    layers = scores.role_scores.shape[0]
    chosen = scores.chosen_layer
    figure = agg_figure((max(6.0, 0.3 * layers + 3), 6.5))
    top, bottom = figure.add_subplot(2, 1, 1), figure.add_subplot(2, 1, 2)
    width = 0.8 / len(scores.roles)
    xs = torch.arange(layers, dtype=torch.float64)
    for r, role in enumerate(scores.roles):
        top.bar((xs - 0.4 + width * (r + 0.5)).tolist(), scores.role_scores[:, r].tolist(), width, label=role)
    top.plot(range(layers), scores.layer_scores.tolist(), color="black", marker="o", markersize=3, label="layer (mean of roles)")
    top.set_ylabel("mean |dL/dW|")
    top.set_title(f"{title}: layer {chosen} (groups {', '.join(scores.groups)}; {scores.samples} samples)")
    for g, group in scores.by_group.items():
        bottom.plot(range(layers), group.layer_scores.tolist(), marker="o", markersize=3,
                    label=f"{g} ({scores.counts[g]}): layer {group.chosen_layer}")
    bottom.set_ylabel("layer score")
    bottom.set_xlabel("layer")
    for axes in (top, bottom):
        axes.axvspan(chosen - 0.45, chosen + 0.45, color="#d62728", alpha=0.15, linewidth=0)
        axes.set_xlim(-0.6, layers - 0.4)
        axes.grid(alpha=0.3, axis="y")
        axes.legend(fontsize=7, frameon=False)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return Path(path)


def write_saliency(sums: SaliencySums, out: str | Path, title: str = "layer saliency",
                   groups: Sequence[str] = GROUPS, **meta: Any) -> list[Path]:
    """DIR/saliency.json (`meta`, then the scores pooled over `groups` and per group, the chosen
    layer, the group counts, and the raw sums) and DIR/saliency.png; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = sums.scores(groups)
    document = {**meta, "layers": sums.num_layers, "roles": list(sums.roles), **scores.to_json(), "sums": sums.to_json()}
    path = out / SALIENCY_JSON
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return [path, plot_saliency(scores, out / SALIENCY_PNG, title)]
