"""Can a router tell, from the prompt alone, which multiple-choice questions survive a cut? A linear probe.

Per-question routing pays off only if the questions whose answer survives a cut can be told apart from the
prompt, before the choices are scored. This script tests that with the routers' own inputs: for each
question of an exhaustive static-chain search (`drllm search --method static --exhaustive`, records with
`prefix_correct`), the full-depth residual stream entering block l, window-pooled over the prompt's last
tokens as a router pools it (`routing.router_net.window_pool`, averaged over the windows), feeds an
L2-regularised logistic regression; the figure is its 5-fold cross-validated ROC AUC (0.5: no signal).

Labels (k: a prefix of the search's static order):
- robust3 / robust6 (k = 3 and the deepest prefix the records scored, 6 in the shipped search): the answer's
  correctness is the same at every prefix 0..k;
- confident: the full model puts ≥ 0.9 or ≤ 0.1 of the choices' probability on the gold choice;
- correct: the full model answers right;
- fixes3 / fixes6: among the questions whose correctness differs between prefix k and full depth, those
  that the cut turns right (the others it turns wrong) — what a router would have to tell apart to gain.
The prompt length (tokens) is the trivial baseline feature.

    .venv/bin/python scripts/probe_robustness.py --data arc:../shared/data/arc/ARC-Easy-Train.jsonl \\
        --records weights/routers/smollm2-135m-pooled/search.jsonl.gz --features runs/probe/features.safetensors
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from routing.executor import RoutedExecutor, pad_right
from routing.model import load_model
from routing.offline.supervision import task_items
from routing.offline.tasks import load_sources, parse_sources
from routing.router_net import window_pool

LAYERS_30 = (4, 8, 12, 16, 18, 20, 24, 29)  # the blocks probed on a 30-block model (the shipped tables)


def probed_layers(L: int) -> tuple[int, ...]:
    """The blocks to probe: LAYERS_30 on 30 blocks, else up to 8 spread evenly over 1..L-1."""
    if L == 30:
        return LAYERS_30
    return tuple(sorted({max(1, round(i * (L - 1) / 8)) for i in range(1, 9)} & set(range(L))))


@torch.inference_mode()
def prompt_features(model, prompts: list[list[int]], window: int = 8, batch: int = 32) -> torch.Tensor:
    """-> [N, L, d]: per prompt and block, the full-depth hidden state entering the block, window-pooled."""
    L = model.spec.n_layers
    ex = RoutedExecutor(model, max_batch=batch, capacity=max(len(p) for p in prompts) + 1)
    out = []
    for i in range(0, len(prompts), batch):
        tokens, lengths = pad_right(prompts[i:i + batch])
        b = len(lengths)
        res = ex.forward(tokens, torch.zeros(b, dtype=torch.long), plans=torch.ones(b, L, dtype=torch.long),
                         lengths=lengths, capture=True)
        assert res.entering is not None
        per = []
        for h in res.entering:
            m, v = window_pool(h.float(), lengths, window)  # [b, W, d], [b, W]
            per.append((m * v[..., None]).sum(1) / v.sum(1, keepdim=True))
        out.append(torch.stack(per, 1).cpu())
        print(f"features: {i + b}/{len(prompts)}", file=sys.stderr, flush=True)
    return torch.cat(out)


def roc_auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """Mann–Whitney U / (n1 n0): the probability that a positive outranks a negative (ties broken by order)."""
    rank = torch.empty(len(score))
    rank[torch.argsort(score)] = torch.arange(1, len(score) + 1, dtype=torch.float)
    pos = y.bool()
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if not n1 or not n0:
        return float("nan")  # one class only: no ranking to measure
    return float((rank[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fit_logistic(F: torch.Tensor, y: torch.Tensor, wd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by LBFGS: F [n, f], y [n] in {0, 1} -> (weights [f], bias [1])."""
    w = torch.zeros(F.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(F @ w + b, y) + wd * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def cv_auc(F: torch.Tensor, y: torch.Tensor, wd: float, folds: int = 5, seed: int = 0) -> float:
    """5-fold cross-validated AUC of `fit_logistic` on standardised F [N, f]."""
    F = (F - F.mean(0)) / (F.std(0) + 1e-6)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = [perm[i::folds] for i in range(folds)]
    score = torch.zeros(len(y))
    for k in range(folds):
        te, tr = parts[k], torch.cat([parts[j] for j in range(folds) if j != k])
        w, b = fit_logistic(F[tr], y[tr], wd)
        score[te] = F[te] @ w + b
    return roc_auc(score, y)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True, help="KIND:PATH, the data the search ran on")
    ap.add_argument("--records", action="append", required=True, help="search records (JSONL, .gz allowed)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wd", type=float, default=1e-2, help="L2 weight on the standardised features")
    ap.add_argument("--features", type=Path, default=None,
                    help="cache of the features (safetensors): read if it exists, else written")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recs = {}
    for path in args.records:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            recs.update({r["id"]: r for r in map(json.loads, filter(str.strip, f)) if r.get("prefix_correct")})
    model = load_model(args.model, device="cpu")
    items = [it for it in task_items(load_sources(parse_sources(args.data, None), None), model.tokenizer)
             if it.id in recs]
    if not items:
        raise SystemExit("no record matches the data's example ids")
    if args.features is not None and args.features.exists():
        X = load_file(args.features)["features"]
    else:
        X = prompt_features(model, [list(it.enc.ids) for it in items])
        if args.features is not None:
            save_file({"features": X.contiguous()}, args.features)
    if X.shape[0] != len(items):
        raise SystemExit(f"{args.features} holds {X.shape[0]} questions, the data {len(items)}")
    pc = [recs[it.id]["prefix_correct"] for it in items]
    soft = [recs[it.id]["base_soft"] for it in items]
    every = list(range(len(items)))
    depth = min(len(p) for p in pc) - 1  # the deepest prefix every record scored
    if depth < 1:
        raise SystemExit("the records score no cut (prefix_correct of length 1)")
    ks = sorted({min(3, depth), depth} if depth > 3 else {depth})
    labels = {f"robust{k}": (every, [all(p[j] == p[0] for j in range(k + 1)) for p in pc]) for k in ks}
    labels |= {"confident": (every, [abs(s - 0.5) > 0.4 for s in soft]), "correct": (every, [p[0] for p in pc])}
    for k in ks:
        changed = [i for i, p in enumerate(pc) if p[k] != p[0]]
        if changed and 0 < sum(pc[i][k] for i in changed) < len(changed):
            labels[f"fixes{k}"] = (changed, [pc[i][k] for i in changed])
    lengths = torch.tensor([[len(it.enc.ids)] for it in items], dtype=torch.float)
    print(f"{len(items)} questions; 5-fold ROC AUC of a logistic probe (0.5: no signal)\n")
    layers = probed_layers(model.spec.n_layers)
    print("| label | questions | positives | prompt length | " + " | ".join(f"block {i}" for i in layers) + " |")
    print("|---|---|---|---|" + "---|" * len(layers))
    for name, (rows, lab) in labels.items():
        y = torch.tensor(lab, dtype=torch.float)
        idx = torch.tensor(rows)
        aucs = [cv_auc(lengths[idx], y, args.wd)] + [cv_auc(X[idx, i], y, args.wd) for i in layers]
        print(f"| {name} | {len(rows)} | {y.mean():.2f} | " + " | ".join(f"{a:.3f}" for a in aucs) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
