"""Focal loss, effective-number class weights, and router training on precomputed features."""

from __future__ import annotations

import math

import pytest
import torch

from routing.offline.train import (
    Features,
    TrainConfig,
    class_metrics,
    effective_number_weights,
    focal_loss,
    split_indices,
    train_routers,
)
from routing.router_net import RouterConfig


def test_focal_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p_y = 0.5 and 0.75
    y = torch.tensor([0, 0])
    want = (-(0.5**2) * math.log(0.5) - (0.25**2) * math.log(0.75)) / 2
    assert float(focal_loss(logits, y, gamma=2.0)) == pytest.approx(want, rel=1e-6)
    w = torch.tensor([2.0, 1.0])
    assert float(focal_loss(logits, y, w, gamma=2.0)) == pytest.approx(2 * want, rel=1e-6)
    # gamma = 0 is cross entropy
    assert float(focal_loss(logits, y, gamma=0.0)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-6)


def test_effective_number_weights_hand_computed() -> None:
    w = effective_number_weights(torch.tensor([1, 0, 3]), beta=0.5)
    # 1/E_n with E_n = (1 - 0.5^n) / 0.5: n=1 -> 1, n=3 -> 0.5/0.875; scaled to sum 2 over present classes
    raw = torch.tensor([1.0, 0.0, 0.5 / 0.875])
    torch.testing.assert_close(w, raw * 2 / raw.sum())
    w = effective_number_weights(torch.tensor([35, 954, 11]), beta=0.999)
    assert w[2] > w[0] > w[1] and float(w.sum()) == pytest.approx(3.0)


def test_split_and_metrics() -> None:
    tr, va = split_indices(10, 0.2, 0)
    assert sorted(tr + va) == list(range(10)) and len(va) == 2
    m = class_metrics(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
    assert m["recall_repeat"] == 0.5 and m["accuracy"] == 0.75


def test_training_learns_separable_labels() -> None:
    torch.manual_seed(0)
    n, L, W, d = 64, 3, 2, 8
    labels = torch.randint(0, 3, (n, L))
    pooled = torch.randn(n, L, W, d) * 0.1
    pooled[..., 0] += labels[..., None].float() * 2  # the label is readable from feature 0
    f = Features(pooled, torch.ones(n, L, W, dtype=torch.bool), labels)
    routers, info = train_routers(f, RouterConfig(L, d, window=W, bottleneck=16),
                                  TrainConfig(epochs=40, batch_size=16, lr=1e-2, val_fraction=0.25), progress=False)
    assert info["history"][-1]["val_accuracy"] > 0.9
    assert len(info["history"]) == 40 and info["val_examples"] == 16
