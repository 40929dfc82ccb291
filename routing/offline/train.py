"""Router training (Dr.LLM): teacher forcing along each example's target plan, focal loss with
effective-number class weights, AdamW with a cosine schedule and warm-up. The base model stays frozen.

The router input of block l is the windowed mean of the hidden state entering l along the target plan.
It depends only on the frozen base and the target, so it is computed once per example ([L, W, d]) and
epochs only run the tiny MLPs."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..executor import RoutedExecutor
from ..model import BaseModel
from ..plan import DECISIONS
from ..router_net import RouterConfig, Routers, window_pool


def effective_number_weights(counts: torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    """Class weights (1 - beta) / (1 - beta^n_c) (Cui et al. 2019), scaled to sum to the number of classes
    present; a class with no samples gets weight 0."""
    n = counts.double()
    w = torch.where(n > 0, (1 - beta) / (1 - torch.pow(torch.tensor(beta, dtype=torch.double), n)),
                    torch.zeros_like(n))
    present = int((n > 0).sum())
    return (w * present / w.sum()).float() if present else w.float()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
               gamma: float = 2.0) -> torch.Tensor:
    """Mean over samples of -w[y] * (1 - p_y)^gamma * log p_y. logits [N, C], target [N]."""
    logp = F.log_softmax(logits.float(), -1).gather(1, target[:, None]).squeeze(1)
    loss = -((1 - logp.exp()) ** gamma) * logp
    if weight is not None:
        loss = loss * weight.to(loss.device)[target]
    return loss.mean()


@dataclass
class Features:
    pooled: torch.Tensor  # [N, L, W, d] float32
    valid: torch.Tensor  # [N, L, W] bool
    labels: torch.Tensor  # [N, L] long: target count of each block


@torch.inference_mode()
def precompute(model: BaseModel, prompts: list[list[int]], targets: list[list[int]], window: int = 8,
               batch: int = 16) -> Features:
    """Router inputs along each target plan (teacher forcing), one prefill per example."""
    ex = RoutedExecutor(model, max_batch=batch, capacity=max(len(p) for p in prompts) + 8)
    pooled, valid = [], []
    for i in range(0, len(prompts), batch):
        ps, ts = prompts[i:i + batch], targets[i:i + batch]
        b, n = len(ps), max(len(p) for p in ps)
        tokens = torch.zeros(b, n, dtype=torch.long)
        for j, p in enumerate(ps):
            tokens[j, :len(p)] = torch.tensor(p)
        lengths = torch.tensor([len(p) for p in ps])
        out = ex.forward(tokens, torch.zeros(b, dtype=torch.long), plans=torch.tensor(ts), lengths=lengths,
                         capture=True)
        assert out.entering is not None
        per_layer = [window_pool(h.float(), lengths, window) for h in out.entering]
        pooled.append(torch.stack([m for m, _ in per_layer], 1).cpu())
        valid.append(torch.stack([v for _, v in per_layer], 1).cpu())
    return Features(torch.cat(pooled), torch.cat(valid), torch.tensor(targets, dtype=torch.long).clamp(0, 2))


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of the steps
    gamma: float = 2.0
    beta: float = 0.999
    val_fraction: float = 0.1
    seed: int = 0


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = max(1, round(n * val_fraction)) if n > 1 and val_fraction > 0 else 0
    return idx[k:], idx[:k]


def _loss(routers: Routers, f: Features, idx: torch.Tensor, weight: torch.Tensor | None,
          gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mean focal loss over layers, predictions [b, L])."""
    L = f.labels.shape[1]
    losses, preds = [], []
    for layer in range(L):
        lg = routers.layers[layer](f.pooled[idx, layer], f.valid[idx, layer])
        losses.append(focal_loss(lg, f.labels[idx, layer], weight, gamma))
        preds.append(lg.argmax(-1))
    return torch.stack(losses).mean(), torch.stack(preds, 1)


def class_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {"accuracy": float((preds == labels).float().mean()) if labels.numel() else 0.0}
    recalls = []
    for c, name in enumerate(DECISIONS):
        m = labels == c
        if m.any():
            r = float((preds[m] == c).float().mean())
            out[f"recall_{name}"] = r
            recalls.append(r)
    out["macro_recall"] = sum(recalls) / len(recalls) if recalls else 0.0
    return out


def train_routers(f: Features, config: RouterConfig, cfg: TrainConfig, progress: bool = True,
                  device: str | torch.device = "cpu") -> tuple[Routers, dict[str, object]]:
    """Train routers on precomputed features (on `device`); the best epoch by validation loss is kept.
    Returns the routers (on `device`, eval mode) and the training history."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    f = Features(f.pooled.to(dev), f.valid.to(dev), f.labels.to(dev))
    routers = Routers(config).to(dev)
    tr, va = split_indices(len(f.labels), cfg.val_fraction, cfg.seed)
    tr_t, va_t = torch.tensor(tr, device=dev), torch.tensor(va, device=dev)
    label_counts = torch.bincount(f.labels[tr_t].flatten(), minlength=3).cpu()
    weight = effective_number_weights(label_counts, cfg.beta)
    opt = torch.optim.AdamW(routers.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(tr) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warm = max(1, round(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor], int] | None = None
    it = range(cfg.epochs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(it, desc="train", unit="epoch")
        it = bar
    for epoch in it:
        routers.train()
        perm = tr_t[torch.randperm(len(tr), generator=gen).to(dev)]
        tot, preds_all, labels_all = 0.0, [], []
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            loss, preds = _loss(routers, f, idx, weight, cfg.gamma)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            preds_all.append(preds)
            labels_all.append(f.labels[idx])
        row = {"epoch": epoch + 1, "train_loss": tot / len(tr),
               **{f"train_{k}": v for k, v in class_metrics(torch.cat(preds_all), torch.cat(labels_all)).items()}}
        routers.eval()
        if len(va):
            with torch.no_grad():
                vloss, vpred = _loss(routers, f, va_t, weight, cfg.gamma)
            row["val_loss"] = float(vloss)
            row.update({f"val_{k}": v for k, v in class_metrics(vpred, f.labels[va_t]).items()})
            if best is None or row["val_loss"] < best[0]:
                best = (row["val_loss"], {k: v.clone() for k, v in routers.state_dict().items()}, epoch + 1)
        history.append(row)
        if bar is not None:
            shown = {"loss": f"{row['train_loss']:.4f}"}
            for name, key, fmt in (("val", "val_loss", ".4f"), ("skip", "val_recall_skip", ".2f"),
                                   ("rep", "val_recall_repeat", ".2f")):
                value = row.get(key)
                if value is not None and math.isfinite(value):  # a class without targets has no recall
                    shown[name] = f"{value:{fmt}}"
            bar.set_postfix(**shown)
    if best is not None:
        routers.load_state_dict(best[1])
    info = {"history": history, "best_epoch": best[2] if best else cfg.epochs, "train_examples": len(tr),
            "val_examples": len(va), "label_counts": label_counts.tolist(), "class_weights": weight.tolist(),
            "final": history[-1] if history else {}}
    return routers.eval(), info
