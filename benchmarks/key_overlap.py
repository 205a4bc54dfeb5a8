"""How much of an edit reaches the neighbour prompts? Key overlap per layer and edit position.

    .venv/bin/python benchmarks/key_overlap.py --layers 2,4,8,12,16,20,24,25,26,27,28,29 --n 100 \
        --bound-layers 27,20,8 --bound-n 40 --json docs/results/key_overlap.json --plot docs/results/key_overlap.png

A rank-1 update written along key k_e (W~ = W + v (P k_e)^T, P = I for the plain gradient step
or C^-1 for the whitened one, MendNetConfig.whiten_keys) changes the layer's output on any
input x by v (k_x^T P k_e): the share of the edited prompt's change that x receives is
leak(x) = k_x^T P k_e / k_e^T P k_e. A locality prompt keeps its answer only if this share is
small where it predicts its answer. MEND and SaLEM's updates are sums of such terms, dominated
by the position that predicts the new object (the prompt's last token); ROME and MEMIT write
theirs at the subject's last token of a middle layer instead.

For each of the first `--n` CounterFact val rows and each layer's down projection (`mlp_out`),
with k_e taken at the prompt's last token and at the subject's last token, this reports the
median over rows of |leak| at the last token (the position that predicts the answer) of (a) the
row's neighbour prompt (same relation, same true object, another subject) and (b) an unrelated
prompt (the next row's neighbour prompt). C is the key second moment over the texts of the
first `--key-rows` train rows, damped as in training (`--damping`).

`--bound-layers` measures what such a write can do at best: for each val row, the value v that
makes the prompt predict target_new when added to the layer's output at that one position is
found by Adam (as ROME does; `--bound-prefixes` also fits it under train fact sentences put
before the prompt), then written as the rank-1 update v (P k_e)^T / k_e^T P k_e, and the edit
is scored like benchmarks/mend_salem.py (one fact per edit, teacher-forced; drawdown on known
held-out pairs). It is the value an editor writing one rank-1 term there would aim for; a MEND
editor has only the gradient to go by.
"""

from __future__ import annotations

import argparse
import itertools
import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from statistics import median

import torch
from tqdm.auto import tqdm

from ft_vs_ftkl import edit_and_score, known_heldout, load_rows  # benchmarks/ is on sys.path when a script here runs
from editing_core.editors.mend import (Factors, MendNetConfig, _captured_io, _modules_of, build_net, edited_forward,
                                       key_second_moments, key_texts, net_targets, set_key_preconditioners)
from editing_core.models import load_model
from editing_core.tokens import completion_batch, completion_logits, completion_nll, subject_last_token
from editing_core.plotting import agg_figure

POSITIONS = ("last", "subject")


@torch.no_grad()
def keys(loaded, names: list[str], text: str) -> dict[str, torch.Tensor]:
    """Each weight's input at every position of `text`: (T, in)."""
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
    with _captured_io(_modules_of(loaded, names)) as seen:
        loaded.model(input_ids=ids)
    return {n: seen[n][0][0].double() for n in names}


def leak(edit_key: torch.Tensor, other_key: torch.Tensor, precondition: torch.Tensor) -> float:
    """|k_x^T P k_e| / k_e^T P k_e: the share of the edited key's change that key k_x receives."""
    aimed = precondition @ edit_key  # (in,)
    return float((other_key @ aimed).abs() / (edit_key @ aimed))


def edit_position(tokenizer, batch, row: int, request, position: str) -> int:
    """The token of `batch` row `row` an edit is written at: the subject's last (its last
    occurrence, after any prefix), or the prompt's last (the one that predicts the target)."""
    if position == "subject":
        return subject_last_token(tokenizer, request.prompt, request.subject, request.prompt.rfind(request.subject))
    return int(batch.target_mask[row].nonzero()[0])


class HookedEdit:
    """A rank-1 update applied by forward hooks; `attached` is all editing_core.evaluate needs."""

    def __init__(self, loaded, factors: dict[str, Factors]):
        self.loaded, self.factors = loaded, factors

    @contextmanager
    def attached(self, _model):
        with edited_forward(self.loaded, self.factors):
            yield


class OptimisedValueWrite:
    """The best rank-1 write at one position of one weight's output (benchmark probe, one fact).

    The value is fitted on the prompt and on each `prefixes` text followed by the prompt (ROME
    fits it under several contexts so that it carries over to reworded ones); the key is the
    mean over those contexts of the weight's input at the position."""

    def __init__(self, name: str, position: str, precondition: torch.Tensor, steps: int, lr: float, stop_nll: float,
                 prefixes: tuple[str, ...] = ()):
        self.name = f"{position} write"
        self.param, self.position, self.precondition = name, position, precondition
        self.steps, self.lr, self.stop_nll, self.prefixes = steps, lr, stop_nll, prefixes

    def edit(self, loaded, requests):
        (request,) = requests
        contexts = [replace(request, prompt=f"{prefix} {request.prompt}") for prefix in self.prefixes]
        batch = completion_batch(loaded.tokenizer, [(r.prompt, r.target_new) for r in (request, *contexts)])
        at = torch.zeros_like(batch.attention_mask, dtype=torch.bool)  # (B, T): where the value is added
        for row, context in enumerate((request, *contexts)):
            at[row, edit_position(loaded.tokenizer, batch, row, context, self.position)] = True
        module = _modules_of(loaded, [self.param])[self.param]
        with torch.no_grad(), _captured_io({self.param: module}) as seen:
            loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        key = seen[self.param][0][at].float().mean(0)  # (in,)
        value = self.optimised_value(loaded, module, batch, at)
        aimed = self.precondition.float() @ key
        return HookedEdit(loaded, {self.param: Factors(left=value[:, None], right=(aimed / (key @ aimed))[None, :])})

    def optimised_value(self, loaded, module, batch, at: torch.Tensor) -> torch.Tensor:
        """v (out,) that, added to `module`'s output where `at` is set, brings the mean target NLL
        of the batch's rows under stop_nll."""
        value = torch.zeros(module.weight.shape[0], requires_grad=True)
        optimizer = torch.optim.Adam([value], lr=self.lr)

        def add_value(_module, _args, output):  # output (B, T, out)
            return output + at[..., None] * value

        handle = module.register_forward_hook(add_value)
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    nll = completion_nll(completion_logits(loaded.model, batch), batch).mean()
                    if nll.item() < self.stop_nll:
                        break
                    optimizer.zero_grad()
                    nll.backward()
                    optimizer.step()
        finally:
            handle.remove()
        return value.detach()


def write_bound(loaded, names: list[str], layers: list[int], preconditioners: dict, args) -> list[dict]:
    """Edit success / paraphrase / locality / drawdown of the optimised rank-1 write per layer and position."""
    requests, heldout = load_rows("val", args.bound_n), known_heldout(loaded, args.heldout)
    # contexts the value is also fitted under: fact sentences of train rows, never the scored rows
    prefixes = tuple(f"{r.prompt} {r.ground_truth}." for r in load_rows("train", args.bound_prefixes)) if args.bound_prefixes else ()
    results = []  # (load_model froze the model: only the value gets gradients)
    for name, layer in zip(names, layers):
        if layer not in args.bound_layers:
            continue
        for position in args.bound_positions.split(","):
            editor = OptimisedValueWrite(name, position, preconditioners[name], args.bound_steps, args.bound_lr, args.bound_nll, prefixes)
            summary = edit_and_score(loaded, editor, requests, 1, heldout, generated=False)
            results.append({"layer": layer, "position": position, "prefixes": len(prefixes), **summary})
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results[-1].items()}), flush=True)
    return results


def plot(summary: list[dict], path: Path, title: str) -> None:
    fig = agg_figure((11, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    for axis, position in zip(axes, POSITIONS):
        for step in ("plain", "whitened"):
            for probe, style in (("neighbour", "-"), ("unrelated", ":")):
                points = [s for s in summary if s["position"] == position and s["step"] == step]
                axis.plot([p["layer"] for p in points], [p[probe] for p in points], style, marker="o",
                          label=f"{step}, {probe} prompt")
        axis.set_title(f"edit key at the {'prompt' if position == 'last' else 'subject'}'s last token")
        axis.set_xlabel("layer (mlp_out)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("median share of the edit at the prompt's last token")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def key_leaks(loaded, names: list[str], layers: list[int], preconditioners: dict, rows) -> tuple[list[dict], int]:
    """Median leak per layer, edit position and step, to the neighbour and an unrelated prompt;
    and the number of rows skipped (subject not in the prompt)."""
    leaks: dict[tuple, list[float]] = {}
    skipped = 0
    for index, row in enumerate(tqdm(rows, desc="rows")):
        subject_at = subject_last_token(loaded.tokenizer, row.prompt, row.subject or "")
        if subject_at is None:
            skipped += 1
            continue
        edited, neighbour = keys(loaded, names, row.prompt), keys(loaded, names, row.locality_prompt)
        unrelated = keys(loaded, names, rows[(index + 1) % len(rows)].locality_prompt)
        for name, layer in zip(names, layers):
            for (position, at), (step, by_name) in itertools.product((("last", -1), ("subject", subject_at)), preconditioners.items()):
                key = edited[name][at]
                leaks.setdefault((layer, position, step, "neighbour"), []).append(leak(key, neighbour[name][-1], by_name[name]))
                leaks.setdefault((layer, position, step, "unrelated"), []).append(leak(key, unrelated[name][-1], by_name[name]))
    summary = [{"layer": layer, "position": position, "step": step,
                "neighbour": median(leaks[(layer, position, step, "neighbour")]),
                "unrelated": median(leaks[(layer, position, step, "unrelated")])}
               for layer, position, step in itertools.product(layers, POSITIONS, preconditioners)]
    return summary, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="4,8,12,16,20,24,26,27,28,29")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--key-rows", type=int, default=400)
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--bound-layers", default="", help="layers (of --layers) whose optimised rank-1 write is scored")
    parser.add_argument("--bound-n", type=int, default=40, help="val rows edited, one at a time, for the bound")
    parser.add_argument("--bound-steps", type=int, default=60, help="Adam steps on the value at most")
    parser.add_argument("--bound-lr", type=float, default=1.0)
    parser.add_argument("--bound-nll", type=float, default=0.3, help="stop once the target NLL (summed over tokens) is below this")
    parser.add_argument("--bound-positions", default="last,subject", help="where the bound's writes go")
    parser.add_argument("--bound-prefixes", type=int, default=0,
                        help="also fit the value under this many train fact sentences put before the prompt")
    parser.add_argument("--heldout", type=int, default=20, help="held-out known pairs for the bound's drawdown")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    args.bound_layers = [int(x) for x in args.bound_layers.split(",") if x]
    unknown = set(args.bound_positions.split(",")) - set(POSITIONS)
    if unknown:
        parser.error(f"--bound-positions: {sorted(unknown)} not in {POSITIONS}")

    loaded = load_model(args.model)
    layers = loaded.adapter.resolve_layers(int(x) for x in args.layers.split(","))
    if set(args.bound_layers) - set(layers):
        parser.error(f"--bound-layers {args.bound_layers} must be among --layers {layers}")
    config = MendNetConfig(layers=tuple(layers), roles=("mlp_out",), whiten_keys=True, whiten_damping=args.damping)
    names = [name for name, _, _ in net_targets(loaded, config)]
    net = build_net(loaded, config)
    set_key_preconditioners(net, key_second_moments(loaded, names, key_texts(load_rows("train", args.key_rows))))
    preconditioners = {"plain": {n: torch.eye(net.key_preconditioner(i).shape[0], dtype=torch.double) for i, n in enumerate(names)},
                       "whitened": {n: net.key_preconditioner(i).double() for i, n in enumerate(names)}}
    summary, skipped = key_leaks(loaded, names, layers, preconditioners, load_rows("val", args.n))
    print(f"rows scored: {args.n - skipped} (subject not found in the prompt: {skipped})")
    print("| layer | edit key at | step | neighbour prompt leak | unrelated prompt leak |\n|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['layer']} | {s['position']} | {s['step']} | {s['neighbour']:.3f} | {s['unrelated']:.3f} |")
    bound = write_bound(loaded, names, layers, preconditioners["whitened"], args) if args.bound_layers else []
    if bound:
        print("| layer | written at | edit_success | paraphrase | locality | drawdown | s / edit |\n|---|---|---|---|---|---|---|")
        for b in bound:
            print(f"| {b['layer']} | {b['position']} | {b['edit_success']:.3f} | {b['paraphrase']:.3f} | {b['locality']:.3f} | "
                  f"{b['drawdown']:.3f} | {b['seconds_per_edit']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "n": args.n, "skipped": skipped, "damping": args.damping,
                                         "key_rows": args.key_rows, "summary": summary, "bound": bound,
                                         "bound_settings": {k: getattr(args, f"bound_{k}") for k in ("n", "steps", "lr", "nll", "prefixes")}}, indent=2))
    if args.plot:
        plot(summary, args.plot, f"{args.model}: how much of a rank-1 edit reaches other prompts ({args.n - skipped} CounterFact val rows)")


if __name__ == "__main__":
    main()
