"""The router networks (Dr.LLM): windowed mean pooling -> bottleneck MLP -> {skip, execute, repeat}."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import router_kernel


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


class _PrefillState:
    """What `Routers.layer_logits` keeps for the prefill under way (see `Routers._prepare`)."""

    __slots__ = ("call", "grad", "last", "lengths", "per_layer", "pooling", "shape", "values")

    def __init__(self, lengths: torch.Tensor, shape: torch.Size, grad: bool) -> None:
        self.lengths, self.shape, self.grad = lengths, shape, grad
        self.last = -1  # the last layer called
        self.call: router_kernel.KernelPrefill | None = None
        self.pooling: tuple | None = None
        self.per_layer: list | None = None
        self.values: tuple | None = None


class Routers(nn.Module):
    """The L routers of a base model. `fused`: whether `layer_logits` may use the fused CPU kernel
    (`routing.router_kernel`, when it builds); False keeps the torch kernels (benchmarks compare both)."""

    fused: bool = True

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            Router(config.hidden_size, config.bottleneck, config.n_classes) for _ in range(config.n_layers)
        )

    def layer_logits(self, layer: int, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden [b, n, d] entering block `layer`; lengths [b] (CPU, each at most n) -> decision logits [b, 3],
        in the routers' dtype (float32 as loaded). Raises ValueError for other shapes or longer lengths.

        30 of these run inside every routed prefill, each right after a block whose weights evicted the
        caches, where each torch kernel or Python step costs ~10-40 us (bench/router_cold.py). So:
        - on the CPU in float32 inference, one call of the fused C kernel (`routing.router_kernel`) does the
          whole router; otherwise five torch kernels (pooling matmul, addmm into fc1, GELU, window-mean
          matmul, addmm into fc2) do `Router.averaged` without reshaping copies;
        - what all layers of a prefill share (the kernel's shape binding and outputs, or the pooling weights)
          is prepared at layer 0, on another `lengths` tensor or shape, or when a layer comes again (see
          `_prepare`); what all prefills share (the kernel bound to the weights, contiguous transposed
          weights) is kept while the weights stay; a later layer's call does no module attribute lookups."""
        st = self.__dict__.get("_prep")
        if layer <= 0 or st is None or st.lengths is not lengths or st.shape != hidden.shape \
                or st.grad != torch.is_grad_enabled() or layer <= st.last:
            st = self._prepare(lengths, hidden)
        st.last = layer
        call = st.call
        if call is not None:  # hidden's shape is as prepared
            if hidden.dtype is not torch.float32 or not hidden.is_contiguous() or not hidden.is_cpu:
                hidden = hidden.to("cpu", torch.float32).contiguous()
            if call.fn(call.weights[layer], call.shape, hidden.data_ptr(), call.pointers[layer]):
                raise MemoryError("the fused router kernel could not allocate its scratch space")
            return call.outputs[layer]
        b1, w1t, b2, w2t = st.per_layer[layer]
        weights, avg, convert = st.pooling  # [b, W, n], [b, 1, W]; hidden's dtype or device differ
        if convert:
            hidden = hidden.to(weights.device, weights.dtype)
        if weights.dim() == 2:  # one row (batch-1 prefill): 2-D kernels
            g = F.gelu(torch.addmm(b1, torch.mm(weights, hidden[0]), w1t), approximate="tanh")
            return torch.addmm(b2, torch.mm(avg, g), w2t)
        b, w = weights.shape[0], weights.shape[1]
        pooled = torch.bmm(weights, hidden)  # [b, W, d]
        g = F.gelu(torch.addmm(b1, pooled.view(b * w, -1), w1t), approximate="tanh")  # [bW, k]
        mixed = torch.bmm(avg, g.view(b, w, -1)).view(b, -1)  # [b, k]: the windows' mean activation
        return torch.addmm(b2, mixed, w2t)

    def _prepare(self, lengths: torch.Tensor, hidden: torch.Tensor) -> _PrefillState:
        """What every layer of one prefill shares: the fused kernel's calls for this shape (the kernel bound
        to the router weights is kept while their tensors and storage stay: it reads them in place), or for
        the torch kernels the pooling weights for `lengths` and hidden's n tokens (kept while those stay) and
        each layer's weights (`_layer_weights`, rebuilt when a weight changes in place: its version moves)."""
        if hidden.dim() != 3 or lengths.dim() != 1 or lengths.shape[0] != hidden.shape[0]:
            raise ValueError(f"hidden must be [b, n, d] and lengths [b]: got {tuple(hidden.shape)} and "
                             f"{tuple(lengths.shape)}")
        if lengths.numel() and int(lengths.max()) > hidden.shape[1]:
            raise ValueError(f"lengths must not exceed the hidden state's {hidden.shape[1]} tokens")
        old = self.__dict__.get("_prep")
        grad = torch.is_grad_enabled()
        params = self._params()
        dev, dtype = params[0].device, params[0].dtype
        convert = hidden.dtype != dtype or hidden.device != dev
        st = _PrefillState(lengths, hidden.shape, grad)
        lib = router_kernel.load() if self.fused and not grad and dev.type == "cpu" and not convert \
            and dtype == torch.float32 and self.config.window <= router_kernel.MAX_WINDOW else None
        if lib is not None:
            key = tuple(t.data_ptr() for t in params)
            bound = self.__dict__.get("_kernel")
            if bound is None or bound[0] != key:
                try:
                    bound = (key, router_kernel.RouterKernel(lib, [tuple(t.detach() for t in params[i: i + 4])
                                                                  for i in range(0, len(params), 4)]))
                except ValueError:  # e.g. weights that are not contiguous: the torch kernels handle them
                    bound = (key, None)
                self.__dict__["_kernel"] = bound
            if bound[1] is not None:
                st.call = bound[1].prefill(lengths, self.config.window, hidden.shape[1])
                self.__dict__["_prep"] = st
                return st
        values = tuple(lengths.tolist())
        if old is not None and old.pooling is not None and old.values == values and old.shape == hidden.shape \
                and old.pooling[0].device == dev and old.pooling[0].dtype == dtype and old.pooling[2] == convert:
            st.pooling = old.pooling
        else:
            weights, valid = pooling_weights(lengths, hidden.shape[1], self.config.window, dtype, dev)
            avg = window_average(valid, dtype).unsqueeze(1)
            if hidden.shape[0] == 1:  # [W, n], [1, W]: 2-D kernels, with no per-layer indexing
                weights, avg = weights[0], avg[0]
            st.pooling = (weights, avg, convert)
        st.values = values
        key = None if grad else self._versions(params)
        cached = self.__dict__.get("_torch_weights")
        if key is not None and cached is not None and cached[0] == key:
            st.per_layer = cached[1]
        else:
            st.per_layer = self._layer_weights(grad)
            self.__dict__["_torch_weights"] = (key, st.per_layer) if key is not None else None
        self.__dict__["_prep"] = st
        return st

    def _params(self) -> list[torch.Tensor]:
        """Every router's (fc1 weight [k, d], fc1 bias [k], fc2 weight [c, k], fc2 bias [c]), flat, cached:
        checking that the modules still hold these tensors is cheaper than looking them up."""
        cache = self.__dict__.get("_param_cache")
        if cache is not None and all(d[name] is t for d, name, t in cache[0]):
            return cache[1]
        entries = [(m._parameters, name, m._parameters[name]) for r in self.layers for m in (r.fc1, r.fc2)
                   for name in ("weight", "bias")]
        flat = [t for _, _, t in entries]
        self.__dict__["_param_cache"] = (entries, flat)
        return flat

    @staticmethod
    def _versions(params: list[torch.Tensor]) -> tuple | None:
        # in-place updates bump a tensor's version; moving it changes its storage. Weights created in
        # inference mode have no version counter: None, so that every prefill rebuilds (slower, never stale)
        try:
            return tuple((t._version, t.data_ptr()) for t in params)
        except RuntimeError:
            return None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self.__dict__.pop("_prep", None)  # .to(), .float(), ...: new storage, maybe new tensors
        self.__dict__.pop("_param_cache", None)
        self.__dict__.pop("_torch_weights", None)
        self.__dict__.pop("_kernel", None)
        return super()._apply(fn, recurse)

    def _layer_weights(self, grad: bool) -> list[tuple[torch.Tensor, ...]]:
        """Per layer (fc1 bias, fc1 weight^T, fc2 bias, fc2 weight^T): contiguous transposed copies, or with
        autograd recording the differentiable transposed views."""
        out = []
        for r in self.layers:
            w1, w2 = r.fc1.weight, r.fc2.weight
            if grad and (w1.requires_grad or w2.requires_grad):
                out.append((r.fc1.bias, w1.t(), r.fc2.bias, w2.t()))
            else:
                with torch.no_grad():
                    out.append((r.fc1.bias, w1.t().contiguous(), r.fc2.bias, w2.t().contiguous()))
        return out

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
