"""The router networks (Dr.LLM): windowed mean pooling -> bottleneck MLP -> {skip, execute, repeat}."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RouterConfig:
    n_layers: int
    hidden_size: int
    window: int = 8  # number of pooling windows (W = min(window, T))
    bottleneck: int = 128
    n_classes: int = 3


def window_pool(h: torch.Tensor, lengths: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each of W = min(window, T) contiguous windows over the T valid tokens of every row.

    h: [b, n, d]; lengths: [b] -> (means [b, window, d], valid [b, window] bool). Window w of a row with
    T tokens covers tokens [floor(w*T/W), floor((w+1)*T/W)): every token counts, remainders included."""
    b, n, _ = h.shape
    lengths = lengths.to(h.device).clamp(min=1)
    W = torch.clamp(lengths, max=window)  # [b]
    t = torch.arange(n, device=h.device)
    win = ((t[None, :] + 1) * W[:, None] - 1) // lengths[:, None]  # [b, n] window of each token
    valid_tok = t[None, :] < lengths[:, None]
    assign = (win[:, None, :] == torch.arange(window, device=h.device)[None, :, None]) & valid_tok[:, None, :]
    assign = assign.to(h.dtype)  # [b, window, n]
    counts = assign.sum(-1, keepdim=True)
    means = (assign @ h) / counts.clamp(min=1)
    return means, counts.squeeze(-1) > 0


class Router(nn.Module):
    def __init__(self, hidden_size: int, bottleneck: int = 128, n_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, bottleneck)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(bottleneck, n_classes)

    def forward(self, pooled: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # pooled: [b, W, d]; valid: [b, W] -> logits [b, n_classes], the mean over valid windows
        logits = self.fc2(self.act(self.fc1(pooled)))
        w = valid.to(logits.dtype).unsqueeze(-1)
        return (logits * w).sum(1) / w.sum(1).clamp(min=1)


class Routers(nn.Module):
    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            Router(config.hidden_size, config.bottleneck, config.n_classes) for _ in range(config.n_layers)
        )

    def layer_logits(self, layer: int, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden [b, n, d] entering block `layer` -> decision logits [b, 3] (float32)."""
        router = self.layers[layer]
        dev = router.fc1.weight.device
        pooled, valid = window_pool(hidden.to(dev, torch.float32), lengths, self.config.window)
        return router(pooled, valid)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
