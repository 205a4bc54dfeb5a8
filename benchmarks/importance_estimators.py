"""Which gradient estimate ranks heads and FFNs like exact ablation? (issue #5)

    .venv/bin/python benchmarks/importance_estimators.py > docs/results/importance_estimators.json

On the shipped capitals task (16 rows, 5 shots, SmolLM2-135M): the per-token |z . dL/dz| score,
the same with |.| per row, |dL/dgate| over the set, and the signed Taylor estimate -dL/dgate,
each ranked (Spearman) against the exact NLL increase and accuracy drop of removing every head
and FFN alone, with the seconds each took.
"""
import json, time
import torch
from editing_core.importance import ImportanceConfig, load_tasks, select_rows, importance_sums, ablation_scores, spearman
from editing_core.models import load_model
torch.set_num_threads(2)
loaded = load_model("smollm2-135m")
task = [t for t in load_tasks() if t.name == "capitals"][0]
cfg = ImportanceConfig(shots=5, batch_size=8, max_rows=16)
rows = select_rows(task, cfg)
t0 = time.perf_counter(); sums = importance_sums(loaded, rows, 5, cfg); tg = time.perf_counter() - t0
# per-row absolute (Michel: expectation over examples of |dL/dgate|): one row per call
t0 = time.perf_counter(); per_row = [importance_sums(loaded, [r], 5, cfg) for r in rows]; tr = time.perf_counter() - t0
row_abs_h = sum(p.head_sum.abs() for p in per_row); row_abs_f = sum(p.ffn_sum.abs() for p in per_row)
t0 = time.perf_counter(); abl = ablation_scores(loaded, rows, 5, cfg); ta = time.perf_counter() - t0
out = {"seconds": {"gradient": tg, "per_row": tr, "ablation": ta}}
for name, h, f in (("per_token_abs", sums.head_abs_sum, sums.ffn_abs_sum), ("per_row_abs", row_abs_h, row_abs_f),
                   ("taylor_minus_sum", -sums.head_sum, -sums.ffn_sum), ("abs_total", sums.head_sum.abs(), sums.ffn_sum.abs())):
    out[name] = {"heads_nll": spearman(h, abl.head_nll_increase), "heads_acc": spearman(h, abl.head_accuracy_drop),
                 "ffn_nll": spearman(f, abl.ffn_nll_increase), "ffn_acc": spearman(f, abl.ffn_accuracy_drop)}
out["ablation_abs_nll_vs_taylor"] = spearman(-sums.head_sum, abl.head_nll_increase)
print(json.dumps(out, indent=1))
