"""Induction heads: a prefix-matching score and a copying score for every attention head.

Olsson et al., "In-context Learning and Induction Heads", 2022,
https://arxiv.org/abs/2209.11895; Bansal et al., "Rethinking the Role of Scale for In-Context
Learning: An Interpretability-based Case Study at 66 Billion Scale", ACL 2023,
https://arxiv.org/abs/2212.09095.

An induction head completes [A][B] ... [A] -> [B]: at the second [A] it attends to the token
right after the earlier [A] (prefix matching) and raises the logit of the token it attends to
(copying).

Prefix matching: random token segments repeated `repeats` times; for every position whose token
occurred before, the attention weight on the positions right after its earlier occurrences,
averaged over positions and sequences. 1.0 is a perfect induction pattern; a uniform causal
pattern gives `InductionScores.prefix_matching_chance`.

Copying: the head's OV circuit, measured by running the model's own modules rather than by
reading weights (value projections are fused and laid out differently in every architecture).
A one-token sequence makes every head attend with weight 1 to that token, so the input of the
attention output projection (attn_out, B x T x heads * head_dim) holds each head's value vector
for it, after the block's own input norm and value projection, grouped-query heads included.
See `copying_scores` for the exact definition.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .models.loading import LoadedModel

Head = tuple[int, int]  # (layer, head)


@dataclass(frozen=True)
class InductionConfig:
    """Induction-head scoring (prefix matching and copying).

    seq_len:     length of one random token segment (tokens drawn without replacement, so a
                 token's earlier occurrence is unique: the same position one segment back).
    n_sequences: how many random sequences are scored for prefix matching.
    repeats:     how many times each segment is repeated in its sequence (>= 2); positions in
                 the second copy onwards are scored. A BOS token is prepended when the
                 tokenizer has one.
    seed:        seed of the token sampling (sequences and copying tokens).
    batch_size:  sequences per forward pass for prefix matching; copying runs the same number
                 of token positions (batch_size * seq_len * repeats one-token sequences) per
                 pass, since small batches waste the weight reads on CPU.
    copy_tokens: how many vocabulary tokens are sampled for the copying score (at most the
                 number of non-special tokens).
    progress:    show progress bars.
    """

    seq_len: int = 25
    n_sequences: int = 20
    repeats: int = 2
    seed: int = 0
    batch_size: int = 10
    copy_tokens: int = 500
    progress: bool = False

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.n_sequences < 1 or self.batch_size < 1:
            raise ValueError("seq_len, n_sequences and batch_size must be >= 1")
        if self.repeats < 2:
            raise ValueError("repeats must be >= 2: prefix matching scores the repeated copies")
        if self.copy_tokens < 1:
            raise ValueError("copy_tokens must be >= 1")


@dataclass(frozen=True)
class InductionScores:
    """Per-head scores, each (layers, heads).

    prefix_matching: 0..1, see `prefix_matching_score`.
    copying: in standard deviations, 0 at chance, negative for copy suppression; see
        `copying_scores`.
    prefix_matching_chance: the prefix-matching score of a uniform causal attention pattern
        on the same token sequences (the copying score's chance level is 0).
    seconds: wall time of the scoring.
    """

    prefix_matching: torch.Tensor
    copying: torch.Tensor
    prefix_matching_chance: float
    config: InductionConfig
    seconds: float = 0.0

    def to_json(self, top_k: int = 10) -> dict[str, Any]:
        return {
            "prefix_matching": self.prefix_matching.tolist(),
            "copying": self.copying.tolist(),
            "prefix_matching_chance": self.prefix_matching_chance,
            "top_prefix_matching": [list(h) for h in top_heads(self.prefix_matching, top_k)],
            "top_copying": [list(h) for h in top_heads(self.copying, top_k)],
            "config": asdict(self.config),
            "seconds": self.seconds,
        }


def _require_causal(loaded: LoadedModel) -> None:
    if not loaded.adapter.arch.causal:
        raise ValueError(
            f"induction-head scores need a causal (decoder-only) language model; {loaded.name!r} is a "
            f"{loaded.adapter.model_type} model with bidirectional attention"
        )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------
# token sampling
# ---------------------------------------------------------------------------------------


def candidate_tokens(loaded: LoadedModel) -> torch.Tensor:
    """Ids that random sequences draw from: the vocabulary (as both tokenizer and embedding
    know it) minus the tokenizer's special tokens. (n,) long."""
    vocab = min(len(loaded.tokenizer), loaded.model.get_input_embeddings().num_embeddings)
    keep = torch.ones(vocab, dtype=torch.bool)
    special = [i for i in loaded.tokenizer.all_special_ids if i is not None and 0 <= i < vocab]
    keep[special] = False
    return keep.nonzero().squeeze(1)


def sample_without_replacement(candidates: torch.Tensor, rows: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, n) ids, each row drawn uniformly without replacement from `candidates`."""
    if n > len(candidates):
        raise ValueError(f"cannot draw {n} distinct tokens from a vocabulary of {len(candidates)} non-special tokens")
    weights = torch.ones(rows, len(candidates))
    return candidates[torch.multinomial(weights, n, replacement=False, generator=generator)]


def repeated_sequences(loaded: LoadedModel, config: InductionConfig) -> torch.Tensor:
    """(n_sequences, [1 +] seq_len * repeats) ids: random segments repeated, BOS first if any."""
    generator = torch.Generator().manual_seed(config.seed)
    segments = sample_without_replacement(candidate_tokens(loaded), config.n_sequences, config.seq_len, generator)
    tokens = segments.repeat(1, config.repeats)
    bos = loaded.tokenizer.bos_token_id
    if bos is not None:
        tokens = torch.cat([torch.full((config.n_sequences, 1), bos), tokens], dim=1)
    return tokens


# ---------------------------------------------------------------------------------------
# prefix matching
# ---------------------------------------------------------------------------------------


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Switch the model to eager attention, which returns attention probabilities with
    `output_attentions=True` (SDPA and flash kernels return none); restore it on exit."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if previous is not None and previous != "eager":
            model.set_attn_implementation(previous)


@torch.no_grad()
def attention_probabilities(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, H, T, T) attention probabilities (query x key) of every layer and head."""
    _require_causal(loaded)
    model = loaded.model
    input_ids = input_ids.to(_device(model))
    with eager_attention(model):
        mask = torch.ones_like(input_ids)
        out = model(input_ids=input_ids, attention_mask=mask, output_attentions=True, use_cache=False)
    attentions = out.attentions or ()
    if len(attentions) != loaded.adapter.num_layers:
        raise RuntimeError(
            f"expected attention probabilities of {loaded.adapter.num_layers} layers, got {len(attentions)}: "
            f"this model does not return them under eager attention"
        )
    return torch.stack([a.float() for a in attentions], dim=1)


def induction_targets(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: [b, i, j] is True when j - 1 < i is an earlier occurrence of token
    tokens[b, i], i.e. key j is where an induction head at query i attends. tokens: (B, T)."""
    length = tokens.shape[1]
    same = tokens[:, :, None] == tokens[:, None, :]  # (B, T query, T key)
    earlier = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril(-1)
    previous = same & earlier  # [b, i, k]: k < i holds the same token as i
    targets = torch.zeros_like(previous)
    targets[:, :, 1:] = previous[:, :, :-1]  # the key right after each earlier occurrence
    return targets


def _prefix_matching_sums(attentions: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum over scored positions of the attention on induction targets (L, H), positions)."""
    if attentions.dim() == 4:
        attentions = attentions.unsqueeze(0)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    batch, _, _, queries, keys = attentions.shape
    if tokens.shape != (batch, queries) or queries != keys:
        raise ValueError(f"attentions {tuple(attentions.shape)} do not match tokens {tuple(tokens.shape)}")
    targets = induction_targets(tokens.to(attentions.device))  # (B, T, T)
    on_targets = (attentions * targets[:, None, None].to(attentions.dtype)).sum(-1)  # (B, L, H, T)
    scored = targets.any(-1)  # (B, T): the token occurred before
    sums = (on_targets * scored[:, None, None].to(on_targets.dtype)).sum(dim=(0, 3))  # (L, H)
    return sums, int(scored.sum())


def prefix_matching_score(attentions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Prefix-matching score (L, H) of attention probabilities on arbitrary token sequences.

    attentions: (L, H, T, T) or (B, L, H, T, T), query x key; tokens: (T,) or (B, T).
    For every query position whose token occurred earlier, the total attention on the
    positions right after its earlier occurrences; the mean over all such positions of all
    sequences. Raises ValueError when no token repeats."""
    sums, count = _prefix_matching_sums(attentions, tokens)
    if count == 0:
        raise ValueError("no token occurs twice: the prefix-matching score is undefined")
    return sums / count


def uniform_causal_attention(length: int) -> torch.Tensor:
    """(T, T) causal pattern spreading each query's attention evenly over keys 0..i."""
    mask = torch.ones(length, length).tril()
    return mask / mask.sum(-1, keepdim=True)


def prefix_matching_scores(loaded: LoadedModel, config: InductionConfig = InductionConfig()) -> torch.Tensor:
    """(L, H) prefix-matching scores of the model on `config`'s repeated random sequences."""
    _require_causal(loaded)
    tokens = repeated_sequences(loaded, config)
    sums = torch.zeros(loaded.adapter.num_layers, loaded.adapter.num_heads)
    count = 0
    batches = range(0, len(tokens), config.batch_size)
    for start in tqdm(batches, desc="prefix matching", disable=not config.progress):
        batch = tokens[start:start + config.batch_size]
        batch_sums, batch_count = _prefix_matching_sums(attention_probabilities(loaded, batch), batch)
        sums += batch_sums.cpu()
        count += batch_count
    return sums / count


def prefix_matching_chance(loaded: LoadedModel, config: InductionConfig = InductionConfig()) -> float:
    """The prefix-matching score of uniform causal attention on `config`'s sequences."""
    tokens = repeated_sequences(loaded, config)
    uniform = uniform_causal_attention(tokens.shape[1]).expand(len(tokens), 1, 1, -1, -1)
    return float(prefix_matching_score(uniform, tokens))


# ---------------------------------------------------------------------------------------
# copying
# ---------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook to end a forward pass once everything needed is captured."""


@contextmanager
def _hooked(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _replace_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A block's call arguments with its hidden states (positional or keyword) replaced."""
    if args:
        return (hidden.to(args[0].dtype), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}


def _run_until_stop(model: nn.Module, inputs_embeds: torch.Tensor) -> None:
    try:
        model(inputs_embeds=inputs_embeds, use_cache=False)
    except _Stop:
        return
    raise RuntimeError("the forward pass ended before the hooks captured their inputs")  # never for HF models


@torch.no_grad()
def token_inputs(loaded: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
    """(N, hidden): each token's own contribution to the residual stream entering block 0.

    The block-0 input of the one-token sequence [t] minus that of a zero input embedding: the
    token embedding, mapped as the model maps it (OPT's project_in, embedding scales), without
    position embeddings (GPT-2, OPT), which the OV circuit of a token should not include."""
    model = loaded.model
    embeds = model.get_input_embeddings()(tokens.to(_device(model)))[:, None, :]  # (N, 1, d_embed)
    embeds = torch.cat([embeds, torch.zeros_like(embeds[:1])])  # last row: no token
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    block = loaded.adapter.blocks()[0]
    with _hooked([block.register_forward_pre_hook(capture, with_kwargs=True)]):
        _run_until_stop(model, embeds)
    hidden = captured[0][:, 0]  # (N + 1, hidden)
    return hidden[:-1] - hidden[-1:]


@torch.no_grad()
def head_values(loaded: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    """(L, N, H, head_dim): every head's value vector for each input (N, hidden), fed to every
    block as a one-token sequence (attention weight 1 on itself). Each block applies its own
    attention input norm and value projection; grouped-query heads get their kv head's value."""
    adapter, model = loaded.adapter, loaded.model
    hidden = inputs[:, None, :]  # (N, 1, hidden)
    values: list[torch.Tensor] = []

    def replace(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _replace_hidden_states(args, kwargs, hidden)

    def capture(module: nn.Module, args: tuple) -> None:
        values.append(args[0])  # (N, 1, H * head_dim)
        if len(values) == adapter.num_layers:
            raise _Stop

    handles = [block.register_forward_pre_hook(replace, with_kwargs=True) for block in adapter.blocks()]
    handles += [adapter.module("attn_out", i).register_forward_pre_hook(capture) for i in range(adapter.num_layers)]
    embeds_dim = model.get_input_embeddings().embedding_dim
    with _hooked(handles):
        _run_until_stop(model, torch.zeros(len(inputs), 1, embeds_dim, dtype=inputs.dtype, device=inputs.device))
    return torch.stack(values)[:, :, 0].unflatten(-1, (adapter.num_heads, adapter.head_dim))


def head_outputs(loaded: LoadedModel, values: torch.Tensor, layer: int) -> torch.Tensor:
    """(N, H, hidden): each head's contribution W_O[:, head] v to the residual stream (without
    the output projection's bias, which no head owns). values: (N, H, head_dim)."""
    adapter = loaded.adapter
    w_out = adapter.as_out_in(adapter.weight("attn_out", layer))  # (hidden, H * head_dim)
    w_out = w_out.unflatten(1, (adapter.num_heads, adapter.head_dim))  # (hidden, H, head_dim)
    return torch.einsum("nhd,ehd->nhe", values.to(w_out.dtype), w_out)


def _final(loaded: LoadedModel, residual: torch.Tensor) -> torch.Tensor:
    """A residual-stream vector (..., hidden) through the modules before the LM head."""
    for module in loaded.adapter.final_modules():
        residual = module(residual)
    return residual


@dataclass(frozen=True)
class Unembedding:
    """The LM head's weight W (vocab, d) and its first two moments over the vocabulary: mean
    (d,) = the mean row, gram (d, d) = W^T W / vocab, all float64. For a direction u the
    logit changes W u over the vocabulary have mean `mean . u` and second moment u^T gram u,
    so their standard deviation needs no (vocab x d) product per head and token."""

    weight: torch.Tensor
    mean: torch.Tensor
    gram: torch.Tensor

    @classmethod
    def of(cls, loaded: LoadedModel, chunk: int = 8192) -> "Unembedding":
        head = loaded.model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise NotImplementedError(f"copying scores need a linear LM head; {loaded.name!r} has {type(head).__name__}")
        weight = head.weight.detach()  # (vocab, d), nn.Linear's (out, in)
        total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
        gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
        for rows in weight.split(chunk):  # float64 without a float64 copy of the whole matrix
            rows = rows.double()
            total += rows.sum(0)
            gram += rows.T @ rows
        return cls(weight, total / len(weight), gram / len(weight))


def _copying_margins(loaded: LoadedModel, unembedding: Unembedding, outputs: torch.Tensor,
                     tokens: torch.Tensor) -> torch.Tensor:
    """(N, H) standardised logit change of token n from head h's output.

    outputs: (N, H, hidden); tokens: (N,). With u = final(o) - final(0), the logit changes
    are delta = W u (the LM head's bias cancels); the margin is
    (delta[t] - mean(delta)) / std(delta) over the vocabulary (population std), 0 where delta
    is constant. Computed from the moments, exactly."""
    n, heads, hidden = outputs.shape
    final = _final(loaded, torch.cat([outputs.reshape(n * heads, hidden), outputs.new_zeros(1, hidden)]))
    u = (final[:-1] - final[-1:]).double().reshape(n, heads, -1)  # (N, H, d)
    mean = u @ unembedding.mean  # (N, H)
    second = torch.einsum("nhd,de,nhe->nh", u, unembedding.gram, u)
    std = (second - mean ** 2).clamp(min=0).sqrt()
    own = torch.einsum("nhd,nd->nh", u, unembedding.weight[tokens.to(u.device)].double())  # delta[t]
    return ((own - mean) / std.clamp(min=1e-12)).float()


@torch.no_grad()
def copying_scores(loaded: LoadedModel, config: InductionConfig = InductionConfig()) -> torch.Tensor:
    """(L, H) copying scores: how far a head's OV circuit raises the logit of the token it
    attends to, in standard deviations of its logit changes over the vocabulary.

    For each of `copy_tokens` sampled non-special tokens t:
        x = token_inputs(t)                       the token's embedding, as block 0 sees it
        v = the head's value vector of x          fed to the layer as a one-token sequence
                                                  (attention input norm, value projection)
        o = W_O[:, head] v                        the head's write to the residual stream
        delta = unembed(final(o)) - unembed(final(0))   final norm(s) then LM head; the zero
                                                  output's logits remove constant biases
        margin_t = (delta[t] - mean_v delta[v]) / std_v delta[v]   (population std)
    score = the mean of margin_t over the sampled tokens. The LM head being linear, the mean
    and std over the vocabulary come exactly from W's moments (`Unembedding`), so no
    (vocab x hidden) product is needed per token and head.

    Chance is 0; a copying head scores well above it (a head whose OV circuit is the identity
    on orthonormal embeddings scores about sqrt(vocab)); copy-suppression heads score below
    0. Standardising makes heads of different layers and models comparable and is invariant
    to the final norm's rescaling of o. It is graded where a top-k hit rate is not: in
    SmolLM2-135M most heads, the prefix-matching ones included, never put t in the top 10 of
    49k tokens through this direct path, yet raise it clearly above the vocabulary's mean.
    The embedding goes straight into each layer, skipping earlier layers, as in the
    OV-circuit analyses of Olsson et al. and Bansal et al.: the alternative, the one-token
    residual stream after earlier layers, is dominated by the first position's massive
    activations (in SmolLM2-135M its norm after block 0 is ~20x the embedding's)."""
    _require_causal(loaded)
    generator = torch.Generator().manual_seed(config.seed + 1)
    candidates = candidate_tokens(loaded)
    tokens = sample_without_replacement(candidates, 1, min(config.copy_tokens, len(candidates)), generator)[0]
    unembedding = Unembedding.of(loaded)
    totals = torch.zeros(loaded.adapter.num_layers, loaded.adapter.num_heads)
    per_pass = config.batch_size * config.seq_len * config.repeats
    batches = range(0, len(tokens), per_pass)
    for start in tqdm(batches, desc="copying", disable=not config.progress):
        batch = tokens[start:start + per_pass]
        values = head_values(loaded, token_inputs(loaded, batch))  # (L, N, H, head_dim)
        for layer in range(loaded.adapter.num_layers):
            outputs = head_outputs(loaded, values[layer], layer)  # (N, H, hidden)
            totals[layer] += _copying_margins(loaded, unembedding, outputs, batch).sum(0).cpu()
    return totals / len(tokens)


def induction_scores(loaded: LoadedModel, config: InductionConfig = InductionConfig()) -> InductionScores:
    """Prefix-matching and copying scores (L, H) of every head."""
    _require_causal(loaded)
    start = time.perf_counter()
    prefix = prefix_matching_scores(loaded, config)
    copying = copying_scores(loaded, config)
    return InductionScores(
        prefix_matching=prefix,
        copying=copying,
        prefix_matching_chance=prefix_matching_chance(loaded, config),
        config=config,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------
# reading the scores
# ---------------------------------------------------------------------------------------


def top_heads(scores: torch.Tensor, k: int) -> list[Head]:
    """The k highest-scoring (layer, head) pairs of a (L, H) score table, best first (ties:
    lower layer, then lower head, first)."""
    order = torch.argsort(scores.flatten(), descending=True, stable=True)[:k]
    heads = scores.shape[1]
    return [(int(i) // heads, int(i) % heads) for i in order]


def overlap(top_a: Sequence[Head], top_b: Sequence[Head]) -> dict[str, Any]:
    """Shared heads of two head lists: count, Jaccard index (1.0 for two empty lists) and the
    shared heads themselves, sorted."""
    a, b = {tuple(h) for h in top_a}, {tuple(h) for h in top_b}
    shared, union = a & b, a | b
    return {
        "count": len(shared),
        "jaccard": len(shared) / len(union) if union else 1.0,
        "shared": sorted(shared),
    }
