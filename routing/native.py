"""The project's native CPU kernels: C sources built into one shared library with the host's compiler on first
use, loaded through ctypes. Today: the fused router (`router_kernel.c`, used by `routing.router_kernel`) and
small per-token operations of the executor (`cpu_ops.c`, used by `routing.cpu_ops`).

Each of them replaces a few torch kernels that run cold, right after a block's weights streamed through the
caches, where a torch kernel's dispatch costs 10-40 us (bench/router_cold.py) while the arithmetic is tiny.
All of them are optional: without a C compiler, or with DRLLM_NATIVE=0, torch's kernels run, and the
results agree to float32 rounding (tests/test_router_kernel.py, tests/test_cpu_ops.py).

The library is cached under $DRLLM_CACHE_DIR (default ~/.cache/drllm)/native with its checksum, keyed by the
sources, the compiler command and flags, and the CPU's feature flags (it is built with -march=native). $CC
names the compiler (split like a shell word list); otherwise cc, gcc or clang from PATH.
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

SOURCES = (Path(__file__).with_name("router_kernel.c"), Path(__file__).with_name("cpu_ops.c"))
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC")
# with torch's own OpenMP runtime (libgomp) in the process, the library is built with OpenMP and shares that
# runtime's thread pool (the loader resolves its libgomp.so.1 to the copy torch loaded), so a call can use
# torch's threads, already spinning after the block, instead of a second pool fighting them
OPENMP_FLAGS = ("-fopenmp",)

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


def _fallback_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"drllm-native-{uid}"


def switched_off(variable: str) -> bool:
    """Whether environment variable `variable` says off: 0, false, no or off, in any case."""
    return os.environ.get(variable, "").strip().lower() in ("0", "false", "no", "off")


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
    library be built with OpenMP, since a second OpenMP runtime would bring a second pool of threads."""
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
    """Compile the library (unless a verified build is cached) and return its path.
    `openmp`: build with OpenMP (OPENMP_FLAGS), so that one call may use several threads.

    The cache directory is $DRLLM_CACHE_DIR/native (default ~/.cache/drllm/native); where it cannot be
    written (a read-only home), a per-user directory under the system's temporary directory, reused by later
    processes. Raises RuntimeError when there is no C compiler or compiling fails, OSError when neither
    directory can be written."""
    cc = _compiler(compiler)
    src = b"".join(s.read_bytes() for s in SOURCES)
    flags = FLAGS + OPENMP_FLAGS if openmp else FLAGS
    key = hashlib.sha256(src + repr((cc, flags, platform.machine(), _cpu_flags())).encode()).hexdigest()[:16]
    name = f"drllm-native-{key}.so"
    for directory in (_cache_dir(), _fallback_dir()):
        out = directory / name
        if _cached(out):
            return out
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=out.parent))
            break
        except OSError as e:
            log.info("native kernel cache %s is not writable (%s)", out.parent, e)
    else:
        raise OSError(f"no writable directory for the native kernels ({_cache_dir()}, {_fallback_dir()})")
    tmp_out = staging / f"build-{name}"
    try:
        res = subprocess.run([*cc, *flags, *(str(s) for s in SOURCES), "-o", str(tmp_out), "-lm"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            why = res.stderr.strip()[:500] or f"{shlex.join(cc)} exited with status {res.returncode}"
            raise RuntimeError(f"compiling {', '.join(s.name for s in SOURCES)} failed: {why}")
        sha = staging / f"build-{name}.sha256"
        sha.write_text(_digest(tmp_out))
        # atomic renames, the library first: concurrent builders each leave a complete, verified pair
        os.replace(tmp_out, out)
        os.replace(sha, out.with_suffix(".sha256"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# the library's functions: (name, argument types); a library lacking one is not used
FUNCTIONS = {
    "drllm_router_logits": [ctypes.c_void_p] * 4,
    "drllm_rms_norm": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_float],
    "drllm_decode_attention": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_float, ctypes.c_int64],
}


def load() -> ctypes.CDLL | None:
    """The loaded library, or None when it is switched off (DRLLM_NATIVE=0) or cannot be built or loaded
    (logged once). Thread-safe; builds at most once per process."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if not switched_off("DRLLM_NATIVE"):
            try:
                lib, path = _load_built()
                for name, argtypes in FUNCTIONS.items():
                    fn = getattr(lib, name)
                    fn.argtypes = argtypes
                    fn.restype = ctypes.c_int
                _lib = lib
                log.info("native CPU kernels: %s (%s)", path, "OpenMP, torch's threads" if openmp(lib) else "one thread")
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
                # AttributeError: a library without one of the functions
                log.warning("native CPU kernels unavailable, using torch kernels: %s", e)
        else:
            log.info("native CPU kernels switched off (DRLLM_NATIVE): using torch kernels")
        _tried = True
    return _lib


def is_gcc(cc: list[str]) -> bool:
    """Whether `cc` is GCC itself (not clang or Intel's compilers, which also define __GNUC__): only GCC's
    -fopenmp links libgomp, the runtime torch already runs; clang's would bring LLVM's libomp, a second pool."""
    try:
        res = subprocess.run([*cc, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    macros = {line.split()[1] for line in res.stdout.splitlines() if line.startswith("#define ")}
    return res.returncode == 0 and "__GNUC__" in macros and not macros & {"__clang__", "__INTEL_COMPILER",
                                                                          "__INTEL_LLVM_COMPILER"}


def _load_built() -> tuple[ctypes.CDLL, Path]:
    """Build (with OpenMP when torch runs on libgomp and the compiler is GCC; without, should that build fail)
    and load."""
    try:
        gomp = torch_uses_libgomp() and is_gcc(_compiler(None))
    except RuntimeError:  # no compiler: build() says so below
        gomp = False
    if gomp:
        try:
            path = build(openmp=True)
            return ctypes.CDLL(str(path)), path
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.info("native kernels: no OpenMP build (%s); building them for one thread", e)
    path = build()
    return ctypes.CDLL(str(path)), path


def openmp(lib: ctypes.CDLL) -> bool:
    """Whether the loaded library was built with OpenMP."""
    fn = getattr(lib, "drllm_router_openmp", None)
    return bool(fn()) if fn is not None else False
