"""The fused CPU router kernel (routing/router_kernel.c) against the torch kernels of `Routers.layer_logits`
and the router modules themselves, its fallback when it cannot be built, and routed prefills with it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from routing import native, router_kernel
from routing.executor import RoutedExecutor
from routing.planner import PlanRequest
from routing.router_net import RouterConfig, Routers, window_pool
from routing.routers import RouterPlanner
from tests.tiny import random_routers, tiny_model

needs_kernel = pytest.mark.skipif(router_kernel.load() is None, reason="no C compiler: the torch kernels run")


def _module_logits(r: Routers, layer: int, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    pooled, valid = window_pool(h, lengths, r.config.window)
    with torch.no_grad():
        return r.layers[layer](pooled, valid)


@needs_kernel
@pytest.mark.parametrize(("d", "k", "window"), [(576, 128, 8), (40, 24, 8), (33, 7, 3), (64, 16, 1), (48, 32, 13)])
def test_fused_kernel_equals_the_router_modules(d: int, k: int, window: int) -> None:
    """Tiled and remainder paths (k not a multiple of 16, W not a multiple of 4), rows shorter than the window
    count and than the padded length, one token, one window."""
    torch.manual_seed(d + k)
    r = Routers(RouterConfig(n_layers=3, hidden_size=d, window=window, bottleneck=k)).eval()
    with torch.no_grad():
        for layer in r.layers:
            layer.fc2.weight.mul_(10)
    for lengths in ([19], [1], [5, 19, 1, 12]):
        h = torch.randn(len(lengths), 19, d)
        lens = torch.tensor(lengths)
        with torch.inference_mode():
            got = [r.layer_logits(layer, h, lens) for layer in range(3)]
        assert r.__dict__["_prep"].call is not None  # the kernel ran
        for layer in range(3):
            torch.testing.assert_close(got[layer], _module_logits(r, layer, h, lens), atol=2e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 200])
def test_threads_split_the_call_and_agree_with_one_thread(threads: int) -> None:
    """An OpenMP build splits fc1's outputs among the call's threads (more threads than outputs: one each)
    and sums their partial logits: the same logits as one thread, to float32 rounding."""
    torch.manual_seed(threads)
    r = Routers(RouterConfig(n_layers=2, hidden_size=40, window=8, bottleneck=24)).eval()
    lib = router_kernel.load()
    w = [(x.fc1.weight.detach(), x.fc1.bias.detach(), x.fc2.weight.detach(), x.fc2.bias.detach()) for x in r.layers]
    for lengths in ([17], [3, 17, 1]):
        h, lens = torch.randn(len(lengths), 17, 40), torch.tensor(lengths)
        one = router_kernel.RouterKernel(lib, w).prefill(lens, 8, 17, threads=1)
        many = router_kernel.RouterKernel(lib, w).prefill(lens, 8, 17, threads=threads)
        for layer in range(2):
            torch.testing.assert_close(many(layer, h), one(layer, h), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(many(layer, h), _module_logits(r, layer, h, lens), atol=2e-5, rtol=1e-5)


def test_the_kernel_shares_torchs_openmp_runtime_only() -> None:
    """Built with OpenMP exactly when torch runs on libgomp (one runtime, one thread pool); and then the
    process still holds a single libgomp."""
    lib = router_kernel.load()
    if lib is None:
        pytest.skip("no C compiler: the torch kernels run")
    assert native.openmp(lib) == native.torch_uses_libgomp()
    if native.openmp(lib):
        maps = Path("/proc/self/maps").read_text().splitlines()
        runtimes = {line.split()[-1] for line in maps if any(r in line for r in ("libgomp", "libomp", "libiomp"))}
        assert len(runtimes) == 1, runtimes  # torch's libgomp alone: no second OpenMP runtime


@needs_kernel
def test_calls_from_another_thread_agree() -> None:
    """The server's engine runs prefills on its own thread: there the kernel's OpenMP team is that thread's
    (as torch's own parallel regions are), with the same logits."""
    import threading

    torch.manual_seed(0)
    r = Routers(RouterConfig(n_layers=3, hidden_size=64, bottleneck=32)).eval()
    h, lens = torch.randn(3, 21, 64), torch.tensor([21, 9, 2])
    got: dict[str, list[torch.Tensor]] = {}

    def run(name: str) -> None:
        with torch.inference_mode():
            got[name] = [r.layer_logits(layer, h, lens).clone() for layer in range(3)]

    run("main")
    t = threading.Thread(target=run, args=("engine",))
    t.start()
    t.join()
    for layer in range(3):
        torch.testing.assert_close(got["engine"][layer], got["main"][layer], atol=0, rtol=0)
        torch.testing.assert_close(got["main"][layer], _module_logits(r, layer, h, lens), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_bound_calls_follow_torchs_thread_count() -> None:
    torch.manual_seed(0)
    r = Routers(RouterConfig(n_layers=2, hidden_size=24, bottleneck=8)).eval()
    h, lens = torch.randn(1, 9, 24), torch.tensor([9])
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            with torch.inference_mode():
                got = r.layer_logits(0, h, lens)
            assert r.__dict__["_prep"].call.threads == n
            torch.testing.assert_close(got, _module_logits(r, 0, h, lens), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_fused_and_torch_kernels_agree_and_follow_weight_updates() -> None:
    torch.manual_seed(0)
    r = Routers(RouterConfig(n_layers=4, hidden_size=32, bottleneck=16)).eval()
    h, lens = torch.randn(2, 11, 32), torch.tensor([11, 6])

    def both() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = []
        for fused in (True, False):
            r.fused = fused
            with torch.inference_mode():
                out.append([r.layer_logits(layer, h, lens) for layer in range(4)])
        r.fused = True
        return out[0], out[1]

    fused, plain = both()
    first = [t.clone() for t in fused]
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # in place, as an optimizer step or load_state_dict: the next prefill sees it
        r.layers[2].fc1.weight.mul_(-1)
        r.layers[3].fc2.bias.add_(3)
    fused, plain = both()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[0], first[0])  # unchanged layers, unchanged logits
    torch.testing.assert_close(fused[3], first[3] + 3)
    assert (fused[2] - first[2]).abs().max() > 1e-3
    for layer in (2, 3):
        torch.testing.assert_close(fused[layer], _module_logits(r, layer, h, lens), atol=1e-5, rtol=1e-5)
    assert torch.equal(first[1], fused[1])  # a later prefill never overwrites logits returned before


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_routed_prefill_with_the_fused_kernel_equals_the_torch_kernels(arch: str) -> None:
    model = tiny_model(arch)
    routers = random_routers(model, 3)
    tokens = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([9, 4, 7])
    reqs = [PlanRequest(), PlanRequest(budget=0.6), PlanRequest()]
    results = []
    for fused in (True, False):
        routers.fused = fused
        with torch.inference_mode():
            results.append(RouterPlanner(routers).prefill(RoutedExecutor(model, max_batch=3), tokens,
                                                          torch.arange(3), lengths, reqs))
    a, b = results
    assert a.plans == b.plans
    assert any(p.skipped or p.repeated for p in a.plans)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    for pa, pb in zip(a.decisions, b.decisions, strict=True):
        torch.testing.assert_close(torch.tensor(pa), torch.tensor(pb), atol=1e-5, rtol=0)


def _fresh_loader(monkeypatch: pytest.MonkeyPatch, cache) -> None:
    """Forget the process's kernel, so that the next `load()` builds again, with its cache under `cache`."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("DRLLM_CACHE_DIR", str(cache))


def test_without_a_compiler_the_torch_kernels_run(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises((RuntimeError, OSError)):
        native.build()
    with caplog.at_level(logging.WARNING, logger="routing.native"):
        assert router_kernel.load() is None
    assert "torch kernels" in caplog.text
    torch.manual_seed(0)
    r = Routers(RouterConfig(n_layers=2, hidden_size=16, bottleneck=8)).eval()
    h, lens = torch.randn(1, 5, 16), torch.tensor([5])
    with torch.inference_mode():
        got = r.layer_logits(1, h, lens)
    assert r.__dict__["_prep"].call is None
    torch.testing.assert_close(got, _module_logits(r, 1, h, lens), atol=1e-5, rtol=0)


def test_the_kernel_can_be_switched_off(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setenv("DRLLM_ROUTER_KERNEL", "0")  # the routers' kernel only
    assert router_kernel.load() is None
    monkeypatch.delenv("DRLLM_ROUTER_KERNEL")
    monkeypatch.setenv("DRLLM_NATIVE", "0")  # every native kernel
    assert native.load() is None and router_kernel.load() is None


@needs_kernel
def test_a_bad_compile_is_an_error_and_the_cache_is_keyed_by_source(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path) -> None:
    monkeypatch.setenv("DRLLM_CACHE_DIR", str(tmp_path))
    first = native.build()
    assert first.exists() and first.parent == tmp_path / "native"
    assert native.build() == first  # cached
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C")
    monkeypatch.setattr(native, "SOURCES", (bad,))
    with pytest.raises(RuntimeError, match="compiling"):
        native.build()


@needs_kernel
@pytest.mark.slow
def test_shipped_routers_decide_the_same_with_the_fused_kernel(default_model) -> None:
    """The default checkpoint on the default model: the same plans and (to float32 rounding) the same
    decision probabilities, batched and one prompt at a time, with and without a budget."""
    from routing.checkpoint import load_routers

    routers = load_routers("default", default_model)
    prompts = ["Question: Which gas do plants take in from the air?\nAnswer:",
               "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
               "Write a haiku about rain."]
    ids = [default_model.tokenizer(p)["input_ids"] for p in prompts]
    n = max(map(len, ids))
    tokens = torch.tensor([x + [0] * (n - len(x)) for x in ids])
    lengths = torch.tensor([len(x) for x in ids])
    for reqs in ([PlanRequest()] * 3, [PlanRequest(budget=0.8), PlanRequest(), PlanRequest(budget=0.6)]):
        for rows in ([0, 1, 2], [1]):
            ix = torch.tensor(rows)
            out = []
            for fused in (True, False):
                routers.fused = fused
                with torch.inference_mode():
                    out.append(RouterPlanner(routers).prefill(
                        RoutedExecutor(default_model, max_batch=3), tokens[ix], torch.arange(len(rows)), lengths[ix],
                        [reqs[i] for i in rows]))
            routers.fused = True
            assert out[0].plans == out[1].plans
            # the probabilities come out of up to 30 blocks of float32 hidden states; the two kernels sum in a
            # different order, which once moved one by 1.06e-5 (a clean-clone CI run on a busy machine)
            torch.testing.assert_close(torch.tensor(out[0].decisions), torch.tensor(out[1].decisions), atol=1e-4,
                                       rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_routers_and_inputs_made_in_inference_mode(fused: bool) -> None:
    """Inference tensors have no version counter: routers loaded, and lengths made, under inference_mode
    (as a server does) still give the modules' logits, also after an in-place weight change there."""
    torch.manual_seed(0)
    with torch.inference_mode():
        r = Routers(RouterConfig(n_layers=3, hidden_size=24, bottleneck=8)).eval()
        r.fused = fused
        h, lens = torch.randn(2, 7, 24), torch.tensor([7, 3])
        for _ in range(2):
            got = [r.layer_logits(layer, h, lens) for layer in range(3)]
            for layer in range(3):
                torch.testing.assert_close(got[layer], _module_logits(r, layer, h, lens), atol=1e-5, rtol=1e-5)
            r.layers[1].fc1.weight.mul_(2)


def test_replaced_or_non_contiguous_weights_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight replaced by a new Parameter is picked up at the next prefill; one that is not contiguous
    makes that prefill take the torch kernels (the fused kernel needs contiguous weights)."""
    torch.manual_seed(0)
    r = Routers(RouterConfig(n_layers=2, hidden_size=24, bottleneck=8)).eval()
    h, lens = torch.randn(1, 9, 24), torch.tensor([9])
    with torch.inference_mode():
        r.layer_logits(0, h, lens)
    r.layers[1].fc1.weight = torch.nn.Parameter(torch.randn(24, 8).t())  # [8, 24], not contiguous
    with torch.inference_mode():
        got = [r.layer_logits(layer, h, lens) for layer in range(2)]
    for layer in range(2):
        torch.testing.assert_close(got[layer], _module_logits(r, layer, h, lens), atol=1e-5, rtol=1e-5)
    assert r.__dict__["_prep"].call is None
    r.layers[1].fc1.weight = torch.nn.Parameter(torch.randn(8, 24))
    with torch.inference_mode():
        got = [r.layer_logits(layer, h, lens) for layer in range(2)]
    for layer in range(2):
        torch.testing.assert_close(got[layer], _module_logits(r, layer, h, lens), atol=1e-5, rtol=1e-5)
    assert (r.__dict__["_prep"].call is not None) == (router_kernel.load() is not None)


def _kernel_works(lib) -> bool:
    torch.manual_seed(0)
    r = Routers(RouterConfig(n_layers=1, hidden_size=16, bottleneck=8)).eval()
    h, lens = torch.randn(1, 5, 16), torch.tensor([5])
    w = [(x.fc1.weight.detach(), x.fc1.bias.detach(), x.fc2.weight.detach(), x.fc2.bias.detach()) for x in r.layers]
    got = router_kernel.RouterKernel(lib, w).prefill(lens, 8, 5)(0, h)
    return bool(torch.allclose(got, _module_logits(r, 0, h, lens), atol=1e-5))


@needs_kernel
def test_a_damaged_cached_library_is_rebuilt_not_loaded(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A library cut short (a crash or a full disk while it was written) would be mapped and kill the process
    with SIGBUS: only a library whose checksum matches is taken from the cache."""
    _fresh_loader(monkeypatch, tmp_path)
    path = native.build(openmp=native.torch_uses_libgomp())  # the build load() takes
    path.write_bytes(path.read_bytes()[:1000])
    lib = router_kernel.load()
    assert lib is not None and _kernel_works(lib)
    assert native._cached(path)


@needs_kernel
def test_a_library_without_the_kernel_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import subprocess

    src = tmp_path / "empty.c"
    src.write_text("int drllm_other;\n")
    bogus = tmp_path / "bogus.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(bogus)], check=True)
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setattr(native, "build", lambda **_: bogus)
    with caplog.at_level(logging.WARNING, logger="routing.native"):
        assert router_kernel.load() is None
    assert "torch kernels" in caplog.text


@needs_kernel
def test_an_unwritable_cache_builds_in_a_temporary_directory(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fresh_loader(monkeypatch, blocker / "cache")  # its parent is a file: nothing can be created there
    lib = router_kernel.load()
    assert lib is not None and _kernel_works(lib)


@needs_kernel
def test_cc_may_hold_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", "cc -std=gnu11")
    assert native._compiler(None) == ["cc", "-std=gnu11"]
    lib = router_kernel.load()
    assert lib is not None and _kernel_works(lib)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("lengths", [[4] * 3, [4] * 200000, [], [100]])
def test_lengths_must_match_the_hidden_state(fused: bool, lengths: list[int]) -> None:
    """A newcomer's finding: lengths with more rows than hidden made the fused kernel read past hidden's end
    (garbage, or a segfault), and lengths beyond n pooled differently on the two paths. Both are errors now,
    on both paths."""
    r = Routers(RouterConfig(n_layers=2, hidden_size=16, bottleneck=8)).eval()
    r.fused = fused
    with torch.inference_mode(), pytest.raises(ValueError, match="lengths"):
        r.layer_logits(0, torch.randn(1, 4, 16), torch.tensor(lengths, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_routers_in_another_dtype_route(dtype: torch.dtype) -> None:
    """A newcomer's finding: routers moved to float64 or bfloat16 raised a dtype mismatch (the pooling
    weights and the hidden state were always float32). They take the torch kernels in their own dtype."""
    torch.manual_seed(0)
    r = Routers(RouterConfig(n_layers=2, hidden_size=16, bottleneck=8)).eval()
    h, lens = torch.randn(2, 5, 16), torch.tensor([5, 3])
    want = [_module_logits(r, layer, h, lens) for layer in range(2)]
    r.to(dtype)
    with torch.inference_mode():
        got = [r.layer_logits(layer, h, lens) for layer in range(2)]
    tol = 1e-5 if dtype == torch.float64 else 5e-2  # against the float32 modules
    for layer in range(2):
        assert got[layer].dtype == dtype
        torch.testing.assert_close(got[layer].float(), want[layer], atol=tol, rtol=tol)


def test_only_gcc_builds_with_openmp(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A newcomer's finding: with CC=clang, -fopenmp linked LLVM's libomp beside torch's libgomp (two thread
    pools), and the log said "torch's threads". Only GCC builds with OpenMP now."""
    fake = tmp_path / "fakeclang"
    fake.write_text("#!/bin/sh\necho '#define __GNUC__ 4'\necho '#define __clang__ 1'\n")
    fake.chmod(0o755)
    assert not native.is_gcc([str(fake)])
    assert not native.is_gcc([str(tmp_path / "missing")])
    if native.load() is not None and native.torch_uses_libgomp():
        assert native.is_gcc(native._compiler(None)) == native.openmp(native.load())


def test_switches_read_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, off in (("off", True), ("False", True), (" NO ", True), ("0", True), ("1", False), ("", False)):
        monkeypatch.setenv("DRLLM_ROUTER_KERNEL", value)
        assert native.switched_off("DRLLM_ROUTER_KERNEL") == off


@needs_kernel
def test_an_unwritable_cache_leaves_no_temporary_directories(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A newcomer's finding: each process left a fresh /tmp/drllm-native-XXXX behind. The fallback is one
    per-user directory, reused."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for _ in range(2):
        _fresh_loader(monkeypatch, blocker / "cache")
        assert router_kernel.load() is not None
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == [native._fallback_dir().name]
