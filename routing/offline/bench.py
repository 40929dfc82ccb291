"""`drllm bench`: the executor against transformers, and routed plans against the full plan, side by side.

Every configuration is measured in the same run, interleaved round by round, and reported as the median
over rounds; the ratios are what to read (absolute times drift on shared machines). The transformers
baseline runs on its own copy of the model, in float32 (CPU) or the bench dtype (CUDA), unquantized and in
transformers' own weight layout. With `--dtype` other than float32 or `--quantization int8`, the greedy
continuations of a fixed prompt set are compared with the float32 model's (the accuracy cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import cpu_ops, native, router_kernel
from ..generation import BatchGenerator, GenerationRequest
from ..model import BaseModel, fetch_default_gguf, load_model
from ..paths import PROJECT_ROOT, base_cache_dir
from ..plan import LayerPlan
from ..planner import FixedPlanner, PlanRequest
from ..router_net import RouterConfig, Routers
from ..routers import RouterPlanner
from ..sampling import SamplingParams

PROMPT = ("Question: A student mixes baking soda and vinegar in a cup and sees bubbles. Which statement best "
          "describes what happened? Choices: A) a physical change B) a chemical reaction C) evaporation D) "
          "condensation. Explain the answer step by step.")


def spread_plan(n_layers: int, executions: int) -> LayerPlan:
    """Skip evenly spaced middle blocks (first and last two always run) down to `executions`."""
    counts = [1] * n_layers
    middle = list(range(2, n_layers - 2))
    drop = n_layers - executions
    for k in range(drop):
        counts[middle[(k * len(middle)) // drop]] = 0
    return LayerPlan(tuple(counts))


AGREEMENT_PROMPTS = (
    "The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
    "Question: What is 12 + 7? Answer:", "Once upon a time, in a small village,",
    "The three primary colors are", "Photosynthesis is the process by which", "import numpy as np\n",
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# wall time by default; `--clock cpu` counts this process's CPU time instead (with --threads 1 on a shared
# machine it measures the work done, not the time spent waiting for a core)
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def _timed(fn: Callable[[], None]) -> float:
    _sync()
    t = CLOCK[0]()
    fn()
    _sync()
    return CLOCK[0]() - t


def greedy(model: BaseModel, prompts: tuple[str, ...], new_tokens: int) -> list[list[int]]:
    gen = BatchGenerator(model, max_batch=len(prompts))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    seqs = [gen.submit(GenerationRequest(model.tokenizer(p)["input_ids"], params)) for p in prompts]
    gen.run_to_completion()
    return [s.generated for s in seqs]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of identical continuations, mean share of tokens before the first divergence)."""
    prefix = []
    for x, y in zip(a, b, strict=True):
        k = next((i for i, (u, v) in enumerate(zip(x, y, strict=True)) if u != v), len(x))
        prefix.append(k / len(x))
    return sum(p == 1.0 for p in prefix) / len(prefix), statistics.mean(prefix)


def executor_run(model: BaseModel, ids: list[int], batch: int, new_tokens: int, plan: LayerPlan) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of BatchGenerator with a fixed plan."""
    gen = BatchGenerator(model, max_batch=batch)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for _ in range(batch):
        gen.submit(GenerationRequest(list(ids), params, plan=plan))
    prefill = _timed(gen.step)
    decode = _timed(gen.run_to_completion)
    return prefill, batch * (new_tokens - 1) / decode


def hf_run(model: BaseModel, ids: list[int], batch: int, new_tokens: int) -> tuple[float, float]:
    x = torch.tensor([ids] * batch, device=model.device)
    mask = torch.ones_like(x)

    def gen(n: int) -> None:
        with torch.inference_mode():
            model.hf.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=model.eos_token_ids[0])

    prefill = _timed(lambda: gen(1))
    total = _timed(lambda: gen(new_tokens))
    return prefill, batch * (new_tokens - 1) / max(total - prefill, 1e-9)


class LlamaCppError(Exception):
    """The llama.cpp runner could not start, died, or refused a request (its message says which)."""


class LlamaCpp:
    """llama.cpp on a GGUF in its own environment (bench/llamacpp_env.sh builds one), run through
    bench/llamacpp_runner.py as a subprocess that stays up between rounds, so that its rounds interleave
    with the executor's. Raises LlamaCppError when the runner cannot start or answers with an error (with
    the end of what it wrote to stderr)."""

    RUNNER = PROJECT_ROOT / "bench" / "llamacpp_runner.py"

    def __init__(self, python: str, gguf: Path, threads: int) -> None:
        if not self.RUNNER.is_file():
            raise LlamaCppError(f"{self.RUNNER} not found: the llama.cpp comparison runs from a source checkout")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen([python, str(self.RUNNER), str(gguf), "--threads", str(threads)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        except OSError as e:
            self.stderr.close()
            raise LlamaCppError(f"cannot run {python}: {e}") from e
        self.gguf = gguf
        try:
            self.info = self._read()
        except LlamaCppError:
            self.close()  # a runner that answered garbage may still be running
            raise

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        try:
            out = json.loads(line) if line else None
        except json.JSONDecodeError:
            out = None
        if not isinstance(out, dict):
            status = self.proc.wait(timeout=30) if not line else "running"
            self.stderr.seek(0)
            tail = self.stderr.read().strip().splitlines()[-3:]
            raise LlamaCppError(f"the llama.cpp runner failed (exit status {status}): "
                                f"{' / '.join(tail) or line.strip() or 'no output'}")
        if "error" in out:
            raise LlamaCppError(f"llama.cpp runner: {out['error']}")
        return out

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode tokens/s) at batch 1, greedy, as `executor_run` measures them."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"ids": ids, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        return out["prefill_s"], out["decode_tps"]

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


def llamacpp_gguf(args: argparse.Namespace) -> Path:
    """The GGUF llama.cpp runs: --llamacpp-gguf, else the model's own when it is a GGUF file or the default
    (the Q4_1 file it is converted from). Raises FileNotFoundError for a missing file, ValueError for another
    model without --llamacpp-gguf."""
    model = str(args.model or "default")
    if args.llamacpp_gguf:
        path = Path(args.llamacpp_gguf)
    elif model.endswith(".gguf"):
        path = Path(model)
    elif model == "default":
        return fetch_default_gguf(base_cache_dir())
    else:
        raise ValueError("--llamacpp-python needs --llamacpp-gguf for a model that is not a GGUF file or the "
                         "default")
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


def start_llamacpp(args: argparse.Namespace) -> LlamaCpp:
    """Check the llama.cpp options and start the runner (before the models load, so that a mistake shows at
    once). Raises ValueError, FileNotFoundError or LlamaCppError."""
    if 1 not in args.batch:
        raise ValueError("--llamacpp-python compares at batch 1: add 1 to --batch")
    if args.new_tokens < 2:
        raise ValueError("--llamacpp-python needs --new-tokens of at least 2 (a decode rate)")
    python = Path(args.llamacpp_python)
    if not python.is_file() or not os.access(python, os.X_OK):
        raise FileNotFoundError(f"--llamacpp-python {python}: not an executable file")
    return LlamaCpp(str(python), llamacpp_gguf(args), torch.get_num_threads())


def router_overhead(model: BaseModel, ids: list[int], rounds: int) -> dict[str, tuple[float, float, float]]:
    """Prefill with routers that always choose 'execute' vs. the same full plan without routers, with the
    fused router kernel ("fused", when it builds on this host) and with the torch kernels ("torch"), rounds
    interleaved. Returns per variant (median prefill without routers, median with, median time inside the
    routers), seconds."""
    routers = Routers(RouterConfig(model.spec.n_layers, model.spec.hidden_size)).to(model.device).eval()
    with torch.no_grad():
        for r in routers.layers:
            r.fc2.bias.copy_(torch.tensor([0.0, 100.0, 0.0]))
    spent = [0.0]
    inner = routers.layer_logits

    def timed_logits(layer: int, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        t = CLOCK[0]()
        out = inner(layer, hidden, lengths)
        spent[0] += CLOCK[0]() - t
        return out

    routers.layer_logits = timed_logits  # type: ignore[method-assign]
    tokens = torch.tensor([ids])
    rows, lengths = torch.arange(1), torch.tensor([len(ids)])
    gen = BatchGenerator(model, max_batch=1)
    variants = {"fused": True, "torch": False} if router_kernel.load() is not None else {"torch": False}
    plain: list[float] = []
    routed: dict[str, list[float]] = {k: [] for k in variants}
    inside: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        plain.append(_timed(lambda: FixedPlanner().prefill(gen.executor, tokens, rows, lengths, [PlanRequest()])))
        for name, fused in variants.items():
            routers.fused = fused
            spent[0] = 0.0
            routed[name].append(_timed(lambda: RouterPlanner(routers).prefill(gen.executor, tokens, rows, lengths,
                                                                              [PlanRequest()])))
            inside[name].append(spent[0])
    p = statistics.median(plain)
    return {k: (p, statistics.median(routed[k]), statistics.median(inside[k])) for k in variants}


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    llamacpp = start_llamacpp(args) if getattr(args, "llamacpp_python", None) else None
    try:
        return _run(args, llamacpp)
    finally:
        if llamacpp is not None:
            llamacpp.close()


def _run(args: argparse.Namespace, llamacpp: LlamaCpp | None) -> int:
    model = load_model(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization)
    ref_dtype = torch.float32 if model.device.type == "cpu" else model.dtype
    reference = load_model(args.model, device=model.device, dtype=ref_dtype)  # transformers' own layout
    L = model.spec.n_layers
    ids = model.tokenizer(PROMPT)["input_ids"]
    plans = {"full": LayerPlan.full(L), f"{round(L * 0.8)}/{L}": spread_plan(L, round(L * 0.8)),
             f"{round(L * 0.6)}/{L}": spread_plan(L, round(L * 0.6))}
    # the LM head's cost does not shrink with skipped blocks: 'ideal+head' counts its weights too
    block = sum(t.numel() for t in (*model.layers[0].parameters(), *model.layers[0].buffers()))
    head = model.hf.lm_head.weight.numel()  # int8 modules keep weights as buffers: counted the same
    print(f"model {model.name} ({L} layers) on {model.device}, {model.dtype}, quantization "
          f"{model.quantization}; transformers baseline in {reference.dtype}; {args.clock} clock; torch threads "
          f"{torch.get_num_threads()}; prompt {len(ids)} tokens; {args.new_tokens} new tokens; "
          f"median of {args.rounds} interleaved rounds")
    first_full_tps: list[float] = []  # batch-1 decode tokens/s of the full plan
    if llamacpp is not None:
        print(f"llama.cpp: llama-cpp-python {llamacpp.info.get('llama_cpp')}, {llamacpp.gguf.name}, "
              f"{llamacpp.info.get('threads')} threads, run side by side at batch 1")
    llamacpp_tps: list[float] = []
    for batch in args.batch:
        executor_run(model, ids, batch, 4, plans["full"])  # warm-up
        hf_run(reference, ids, batch, 4)
        side = llamacpp is not None and batch == 1
        if side:
            llamacpp.run(ids, 4)
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in ["transformers", *plans]}
        if side:
            res["llama.cpp"] = []
        # the full plan with torch's kernels in place of the native per-token operations (routing.cpu_ops)
        torch_ops = model.device.type == "cpu" and model.dtype == torch.float32 and native.load() is not None
        if torch_ops:
            res["full, torch ops"] = []
        for _ in range(args.rounds):
            res["transformers"].append(hf_run(reference, ids, batch, args.new_tokens))
            if side:
                res["llama.cpp"].append(llamacpp.run(ids, args.new_tokens))
            for name, plan in plans.items():
                res[name].append(executor_run(model, ids, batch, args.new_tokens, plan))
            if torch_ops:
                cpu_ops.enabled = False
                try:
                    res["full, torch ops"].append(executor_run(model, ids, batch, args.new_tokens, plans["full"]))
                finally:
                    cpu_ops.enabled = True
        med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for k, v in res.items()}
        print(f"\nbatch {batch}")
        print(f"{'config':<22}{'executions':>11}{'prefill ms':>12}{'decode tok/s':>14}{'vs transformers':>17}"
              f"{'vs full':>9}{'ideal':>7}{'ideal+head':>12}")
        hf_tps = med["transformers"][1]
        if batch == 1:
            first_full_tps.append(med["full"][1])
        print(f"{'transformers generate':<22}{L:>11}{med['transformers'][0] * 1e3:>12.1f}{hf_tps:>14.1f}"
              f"{1.0:>17.2f}")
        if side:
            p, d = med["llama.cpp"]
            llamacpp_tps.append(d)
            print(f"{'llama.cpp (GGUF)':<22}{L:>11}{p * 1e3:>12.1f}{d:>14.1f}{d / hf_tps:>17.2f}")
        for name, plan in plans.items():
            p, d = med[name]
            print(f"{'executor ' + name:<22}{plan.executions:>11}{p * 1e3:>12.1f}{d:>14.1f}{d / hf_tps:>17.2f}"
                  f"{d / med['full'][1]:>9.2f}{L / plan.executions:>7.2f}"
                  f"{(L * block + head) / (plan.executions * block + head):>12.2f}")
        if torch_ops:
            p, d = med["full, torch ops"]
            print(f"{'executor full, torch':<22}{L:>11}{p * 1e3:>12.1f}{d:>14.1f}{d / hf_tps:>17.2f}"
                  f"{d / med['full'][1]:>9.2f}   (torch's kernels for RMSNorm and decode attention)")
    if model.dtype != reference.dtype or model.quantization != "none":
        share, prefix = agreement(greedy(model, AGREEMENT_PROMPTS, 32), greedy(reference, AGREEMENT_PROMPTS, 32))
        print(f"\ngreedy agreement with {reference.dtype} over {len(AGREEMENT_PROMPTS)} prompts x 32 tokens: "
              f"{100 * share:.0f}% identical continuations, {100 * prefix:.1f}% of tokens before the first "
              "divergence")
    if llamacpp is not None:
        if llamacpp_tps and first_full_tps:
            print(f"llama.cpp side by side: {llamacpp_tps[0]:.1f} tok/s at batch 1 -> executor full / llama.cpp = "
                  f"{first_full_tps[0] / llamacpp_tps[0]:.2f}")
    if args.llamacpp_tps and first_full_tps:
        print(f"llama.cpp reference: {args.llamacpp_tps:.1f} tok/s at batch 1 -> executor full / llama.cpp = "
              f"{first_full_tps[0] / args.llamacpp_tps:.2f}")
    print(f"\nrouter overhead at prefill ({len(ids)} tokens, median of {args.rounds * 3} interleaved rounds):")
    for name, (plain, routed, inside) in router_overhead(model, ids, args.rounds * 3).items():
        kernels = "fused router kernel" if name == "fused" else "torch kernels"
        print(f"  {kernels + ':':<21}{inside * 1e3:.2f} ms inside the {L} routers = {100 * inside / plain:.2f}% of a "
              f"{plain * 1e3:.1f} ms prefill (end-to-end routed/plain prefill {routed / plain:.3f})")
    return 0
