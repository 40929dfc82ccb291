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


def pooling_weights(lengths: torch.Tensor, n: int, window: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Averaging weights of W = min(window, T) contiguous windows over the T valid tokens of every row.

    lengths: [b] -> (weights [b, window, n] whose rows average their window's tokens, valid [b, window]).
    Window w of a row with T tokens covers tokens [floor(w*T/W), floor((w+1)*T/W)): every token counts,
    remainders included."""
    lengths = lengths.to(device).clamp(min=1)
    W = torch.clamp(lengths, max=window)  # [b]
    t = torch.arange(n, device=device)
    win = ((t[None, :] + 1) * W[:, None] - 1) // lengths[:, None]  # [b, n] window of each token
    valid_tok = t[None, :] < lengths[:, None]
    assign = (win[:, None, :] == torch.arange(window, device=device)[None, :, None]) & valid_tok[:, None, :]
    assign = assign.to(dtype)
    counts = assign.sum(-1, keepdim=True)
    return assign / counts.clamp(min=1), counts.squeeze(-1) > 0


def window_pool(h: torch.Tensor, lengths: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h: [b, n, d]; lengths: [b] -> (window means [b, window, d], valid [b, window] bool)."""
    weights, valid = pooling_weights(lengths, h.shape[1], window, h.dtype, h.device)
    return weights @ h, valid


class Router(nn.Module):
    def __init__(self, hidden_size: int, bottleneck: int = 128, n_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, bottleneck)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(bottleneck, n_classes)

    def forward(self, pooled: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # pooled: [b, W, d]; valid: [b, W] -> logits [b, n_classes], the mean over valid windows
        return self.averaged(pooled, window_average(valid, pooled.dtype))

    def averaged(self, pooled: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        # avg: [b, W] weights summing to 1 over the valid windows. fc2 is affine, so the mean of the
        # windows' logits is fc2 of the mean of their bottleneck activations (one small matmul fewer).
        g = self.act(self.fc1(pooled))  # [b, W, k]
        return self.fc2((avg.unsqueeze(1) @ g).squeeze(1))


def window_average(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = valid.to(dtype)
    return w / w.sum(-1, keepdim=True).clamp(min=1)


class Routers(nn.Module):
    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            Router(config.hidden_size, config.bottleneck, config.n_classes) for _ in range(config.n_layers)
        )

    def layer_logits(self, layer: int, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden [b, n, d] entering block `layer` -> decision logits [b, 3] (float32).

        `Router.averaged` in five kernels (two batched matmuls, two addmm on the modules' transposed
        weights, one GELU) and no reshaping copies: 30 of these run inside every routed prefill."""
        router = self.layers[layer]
        dev = router.fc1.weight.device
        weights, avg = self._weights(lengths, hidden.shape[1], dev)  # [b, W, n], [b, 1, W]
        b, w = weights.shape[0], weights.shape[1]
        pooled = torch.bmm(weights, hidden.to(dev, torch.float32))  # [b, W, d]
        g = router.act(torch.addmm(router.fc1.bias, pooled.view(b * w, -1), router.fc1.weight.t()))  # [bW, k]
        mixed = torch.bmm(avg, g.view(b, w, -1)).view(b, -1)  # [b, k]: the windows' mean activation
        return torch.addmm(router.fc2.bias, mixed, router.fc2.weight.t())

    def _weights(self, lengths: torch.Tensor, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # every layer of one prefill pools the same tokens: build the weights once
        key = (tuple(lengths.tolist()), n, device)
        if getattr(self, "_pool_key", None) != key:
            self._pool_key = key
            weights, valid = pooling_weights(lengths, n, self.config.window, torch.float32, device)
            self._pool = (weights, window_average(valid, torch.float32).unsqueeze(1))
        return self._pool

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
