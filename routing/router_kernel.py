"""The fused CPU router kernel (`router_kernel.c`): built with the host's C compiler on first use, loaded
through ctypes, and used by `Routers.layer_logits` for float32 CPU inference.

A routed prefill calls the 30 routers one by one, each right after a block whose weights evicted the caches.
There, each of the router's five torch kernels costs 10-40 us of cold dispatch, so the routers took 3-5 % of
a 49-token prefill although their arithmetic is ~0.1 % of it (bench/router_cold.py). The kernel does the
same arithmetic in one call. It is optional: without a C compiler, or with DRLLM_ROUTER_KERNEL=0, the torch
kernels run, and the results agree to float32 rounding (tests/test_router_kernel.py).

The shared library is cached under $DRLLM_CACHE_DIR (default ~/.cache/drllm)/native with its checksum, keyed
by the source, the compiler command and flags, and the CPU's feature flags (it is built with -march=native).
$CC names the compiler (split like a shell word list); otherwise cc, gcc or clang from PATH.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("router_kernel.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC")
# with torch's own OpenMP runtime (libgomp) in the process, the kernel is built with OpenMP and shares that
# runtime's thread pool (the loader resolves its libgomp.so.1 to the copy torch loaded), so a call can use
# torch's threads, already spinning after the block, instead of a second pool fighting them
OPENMP_FLAGS = ("-fopenmp",)
MAX_WINDOW = 64  # the kernel's per-row window count array

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("DRLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "drllm")
    return Path(root) / "native"


def _compiler(compiler: str | None) -> list[str]:
    """The compiler command: `compiler`, else $CC (split like a shell word list, so `ccache gcc` works), else
    cc, gcc or clang from PATH. Raises RuntimeError when there is none."""
    if compiler or os.environ.get("CC"):
        cmd = shlex.split(compiler or os.environ["CC"])
        if cmd:
            return cmd
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not found:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH; set CC to use another")
    return [found]


def torch_uses_libgomp() -> bool:
    """Whether this process runs torch on GNU OpenMP (libgomp, as torch's Linux wheels do): only then may the
    kernel be built with OpenMP, since a second OpenMP runtime would bring a second pool of threads."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(out: Path) -> bool:
    """A cached library counts only with its checksum beside it, matching: a file cut short by a crash or a
    full disk would otherwise be mapped, and die with SIGBUS, at load."""
    try:
        return out.is_file() and out.with_suffix(".sha256").read_text().strip() == _digest(out)
    except OSError:
        return False


def build(compiler: str | None = None, openmp: bool = False) -> Path:
    """Compile the kernel (unless a verified build is cached) and return the shared library's path.
    `openmp`: build with OpenMP (OPENMP_FLAGS), so that one call may use several threads.

    The cache directory is $DRLLM_CACHE_DIR/native (default ~/.cache/drllm/native); where it cannot be
    written (a read-only home), the build goes to a fresh temporary directory instead. Raises RuntimeError
    when there is no C compiler or compiling fails, OSError when no directory can be written."""
    cc = _compiler(compiler)
    src = SOURCE.read_bytes()
    flags = FLAGS + OPENMP_FLAGS if openmp else FLAGS
    key = hashlib.sha256(src + repr((cc, flags, platform.machine(), _cpu_flags())).encode()).hexdigest()[:16]
    name = f"router_kernel-{key}.so"
    out = _cache_dir() / name
    if _cached(out):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent))
    except OSError as e:
        log.info("router kernel cache %s is not writable (%s): building in a temporary directory", out.parent, e)
        staging = Path(tempfile.mkdtemp(prefix="drllm-native-"))
        out = staging / name
    tmp_out = staging / f"build-{name}"
    try:
        res = subprocess.run([*cc, *flags, str(SOURCE), "-o", str(tmp_out), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {res.stderr.strip()[:500]}")
        sha = staging / f"build-{name}.sha256"
        sha.write_text(_digest(tmp_out))
        # atomic renames, the library first: concurrent builders each leave a complete, verified pair
        os.replace(tmp_out, out)
        os.replace(sha, out.with_suffix(".sha256"))
    finally:
        if staging != out.parent:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def load() -> ctypes.CDLL | None:
    """The loaded kernel, or None when it is disabled (DRLLM_ROUTER_KERNEL=0) or cannot be built (logged
    once). Thread-safe; builds at most once per process."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("DRLLM_ROUTER_KERNEL", "1") not in ("0", "false", "no"):
            try:
                lib, path = _load_built()
                fn = lib.drllm_router_logits
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                fn.restype = ctypes.c_int
                _lib = lib
                log.info("fused router kernel: %s (%s)", path,
                         "OpenMP, torch's threads" if openmp(lib) else "one thread")
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
                # AttributeError: a library without the kernel's function
                log.warning("fused router kernel unavailable, using torch kernels: %s", e)
        else:
            log.info("fused router kernel switched off (DRLLM_ROUTER_KERNEL): using torch kernels")
        _tried = True
    return _lib


def _load_built() -> tuple[ctypes.CDLL, Path]:
    """Build (with OpenMP when torch runs on libgomp; without, should that build fail) and load."""
    if torch_uses_libgomp():
        try:
            path = build(openmp=True)
            return ctypes.CDLL(str(path)), path
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.info("router kernel: no OpenMP build (%s); building it for one thread", e)
    path = build()
    return ctypes.CDLL(str(path)), path


def openmp(lib: ctypes.CDLL) -> bool:
    """Whether the loaded kernel was built with OpenMP (libraries built before it could say are not)."""
    fn = getattr(lib, "drllm_router_openmp", None)
    return bool(fn()) if fn is not None else False


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
