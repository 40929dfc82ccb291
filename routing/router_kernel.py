"""The fused CPU router kernel (`router_kernel.c`, built into the native library of `routing.native`), used by
`Routers.layer_logits` for float32 CPU inference.

A routed prefill calls the 30 routers one by one, each right after a block whose weights evicted the caches.
There, each of the router's five torch kernels costs 10-40 us of cold dispatch, so the routers took 3-5 % of
a 49-token prefill although their arithmetic is ~0.1 % of it (bench/router_cold.py). The kernel does the
same arithmetic in one call. It is optional: without a C compiler, with DRLLM_NATIVE=0, or with
DRLLM_ROUTER_KERNEL=0 (routers only), the torch kernels run, and the results agree to float32 rounding
(tests/test_router_kernel.py).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from . import native

log = logging.getLogger(__name__)

MAX_WINDOW = 64  # the kernel's per-row window count array
_switched_off_logged = [False]


def load() -> ctypes.CDLL | None:
    """The native library for the router kernel, or None when DRLLM_ROUTER_KERNEL=0 (logged once) or the
    library is unavailable (`native.load`)."""
    if native.switched_off("DRLLM_ROUTER_KERNEL"):
        if not _switched_off_logged[0]:
            log.info("fused router kernel switched off (DRLLM_ROUTER_KERNEL): using torch kernels")
            _switched_off_logged[0] = True
        return None
    return native.load()


class _Weights(ctypes.Structure):
    _fields_ = [("w1", ctypes.c_void_p), ("b1", ctypes.c_void_p), ("w2", ctypes.c_void_p), ("b2", ctypes.c_void_p),
                ("d", ctypes.c_int64), ("k", ctypes.c_int64), ("c", ctypes.c_int64)]


class _Shape(ctypes.Structure):
    _fields_ = [("lengths", ctypes.c_void_p), ("b", ctypes.c_int64), ("n", ctypes.c_int64),
                ("window", ctypes.c_int64), ("threads", ctypes.c_int64)]


class RouterKernel:
    """The fused kernel bound to every layer's router weights (fc1 weight [k, d], fc1 bias [k], fc2 weight
    [c, k], fc2 bias [c]; float32, contiguous, on the CPU; kept alive by this object, which reads them in
    place). Bound once while the weights keep their storage; `prefill()` binds one prefill's shape. Raises
    ValueError for weights of the wrong dtype, shape, device or layout."""

    def __init__(self, lib: ctypes.CDLL,
                 layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.fn = lib.drllm_router_logits
        self.layers = layers
        self.d, self.c = layers[0][0].shape[1], layers[0][2].shape[0]
        self._weights = []
        for w1, b1, w2, b2 in layers:
            k, d = w1.shape
            for t, shape in ((w1, (k, self.d)), (b1, (k,)), (w2, (self.c, k)), (b2, (self.c,))):
                if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.shape != shape:
                    raise ValueError("router weights must be contiguous float32 CPU tensors of matching shapes")
            self._weights.append(_Weights(w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(), d, k, self.c))
        self.addr = [ctypes.addressof(w) for w in self._weights]

    def prefill(self, lengths: torch.Tensor, window: int, n: int, threads: int | None = None) -> KernelPrefill:
        """The calls of one prefill: hidden [b, n, d] with `lengths` [b] valid tokens per row, `window` pooling
        windows. `threads`: how many threads one call may use (default torch.get_num_threads(); an OpenMP
        build shares the work among them, other builds use one). Raises ValueError for more than MAX_WINDOW
        windows or lengths of the wrong shape."""
        return KernelPrefill(self, lengths, window, n, threads)


class KernelPrefill:
    """One prefill's calls of a `RouterKernel`: `__call__(layer, hidden)` returns that layer's logits [b, c]
    (float32, a new tensor) for hidden [b, n, d] (float32, contiguous, CPU, as bound). `Routers.layer_logits`
    makes the same call without the checks: `fn(weights[layer], shape, hidden pointer, pointers[layer])`,
    writing into `outputs[layer]`, one [b, c] tensor per layer allocated here."""

    def __init__(self, kernel: RouterKernel, lengths: torch.Tensor, window: int, n: int,
                 threads: int | None) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"the fused router kernel supports 1 to {MAX_WINDOW} windows")
        if lengths.dim() != 1:
            raise ValueError("lengths must be one-dimensional")
        self.fn, self.weights, self.kernel = kernel.fn, kernel.addr, kernel
        self.lengths = lengths.to(torch.int64, copy=True)  # owned: the caller may reuse its tensor
        b = self.lengths.shape[0]
        self.threads = max(1, threads if threads is not None else torch.get_num_threads())
        self._shape = _Shape(self.lengths.data_ptr(), b, n, window, self.threads)
        self.shape = ctypes.addressof(self._shape)
        self.hidden_shape = (b, n, kernel.d)
        block = torch.empty((len(kernel.addr), b, kernel.c), dtype=torch.float32)
        self.outputs = list(block.unbind(0))
        base, step = block.data_ptr(), b * kernel.c * block.element_size()
        self.pointers = [base + i * step for i in range(len(kernel.addr))]

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if tuple(hidden.shape) != self.hidden_shape or hidden.dtype != torch.float32 \
                or not hidden.is_contiguous() or hidden.device.type != "cpu":
            raise ValueError("hidden must be a contiguous float32 CPU tensor of the bound shape")
        out = torch.empty(self.hidden_shape[0], self.kernel.c, dtype=torch.float32)
        if self.fn(self.weights[layer], self.shape, hidden.data_ptr(), out.data_ptr()):
            raise MemoryError("the fused router kernel could not allocate its scratch space")
        return out
