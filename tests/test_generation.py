"""BatchGenerator: value outputs, per-row isolation, stop strings and min_tokens, incremental detokenization,
and the logprob token names and offsets of byte-level tokens (the default model's tokenizer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import ARCHS, DEVICES, random_routers, tiny_model
from toytok import CHARS, toy_model

from routing.chunked_prefill import LayerMajorExecutor
from routing.detokenize import IncrementalDetokenizer, StopStrings, TokenNames, decode_with_offsets
from routing.executor import ForwardOutput, RoutedExecutor
from routing.generation import BatchGenerator, ContextLengthError, GenerationRequest, SequenceOutput
from routing.model import BaseModel
from routing.routers import RouterPlanner
from routing.sampling import SamplingParams


def greedy(max_tokens: int = 6, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def run_alone(model: BaseModel, req: GenerationRequest) -> list[int]:
    g = BatchGenerator(model, max_batch=1)
    s = g.submit(req)
    g.run_to_completion()
    return s.generated


def collect(gen: BatchGenerator) -> dict[int, list[SequenceOutput]]:
    outs: dict[int, list[SequenceOutput]] = {}
    while gen.has_work():
        for o in gen.step():
            outs.setdefault(o.seq_id, []).append(o)
    return outs


@pytest.mark.parametrize("arch", ARCHS)
def test_a_row_with_non_finite_logits_fails_alone(arch: str) -> None:
    model = tiny_model(arch)
    reqs = [GenerationRequest([5, 6, 7], greedy(8)), GenerationRequest([9, 10], greedy(8)),
            GenerationRequest([11, 12, 13, 14], SamplingParams(max_tokens=8, temperature=0.9, seed=3, ignore_eos=True))]
    alone = [run_alone(model, r) for r in reqs]
    gen = BatchGenerator(model, max_batch=3)
    seqs = [gen.submit(r) for r in reqs]
    real = gen.executor.forward
    calls = []

    def poisoned(*a: object, **k: object) -> ForwardOutput:
        out = real(*a, **k)  # type: ignore[arg-type]
        calls.append(1)
        if len(calls) == 3 and seqs[1] in gen.running:  # the second decode step: row of seqs[1] breaks
            logits = out.logits.clone()
            logits[gen.running.index(seqs[1])] = float("nan")
            return dataclasses.replace(out, logits=logits)
        return out

    gen.executor.forward = poisoned  # type: ignore[method-assign]
    outs = collect(gen)
    bad = outs[seqs[1].seq_id][-1]
    assert bad.finish_reason == "error" and "non-finite" in (bad.error or "")
    assert seqs[0].generated == alone[0] and seqs[2].generated == alone[2]
    assert [o.finish_reason for o in outs[seqs[0].seq_id]][-1] == "length"


def test_a_failing_prefill_fails_only_the_admitted_sequences() -> None:
    model = tiny_model("llama")
    first = GenerationRequest([1, 2, 3], greedy(6))
    gen = BatchGenerator(model, max_batch=2)
    s1 = gen.submit(first)
    gen.step()
    real = gen.planner.prefill

    def broken(*a: object, **k: object) -> object:
        gen.planner.prefill = real  # type: ignore[method-assign]
        raise RuntimeError("boom")

    gen.planner.prefill = broken  # type: ignore[method-assign]
    s2 = gen.submit(GenerationRequest([4, 5], greedy(6)))
    outs = collect(gen)
    assert outs[s2.seq_id][-1].finish_reason == "error" and "RuntimeError" in (outs[s2.seq_id][-1].error or "")
    assert s1.generated == run_alone(model, first)


def test_outputs_are_values_that_add_up_to_the_sequence() -> None:
    model = toy_model()
    gen = BatchGenerator(model, max_batch=2)
    s = gen.submit(GenerationRequest([40, 41, 42], greedy(7, logprobs=2), prompt_logprobs=True))
    outs = collect(gen)[s.seq_id]
    assert all(dataclasses.is_dataclass(o) and o.__dataclass_params__.frozen for o in outs)  # type: ignore[attr-defined]
    assert "".join(o.text for o in outs) == s.text == model.tokenizer.decode(s.generated)
    assert [t for o in outs for t in o.token_ids] == s.generated
    assert outs[0].routing is not None and all(o.routing is None for o in outs[1:])
    assert outs[0].prompt_logprobs is not None and len(outs[0].prompt_logprobs) == 3
    assert outs[0].prompt_logprobs[0].logprob is None
    assert [lp.text_offset for o in outs for lp in o.logprobs] == list(range(7))  # one character per token
    assert outs[-1].finished and outs[-1].num_generated_tokens == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        outs[0].text = "x"  # type: ignore[misc]


def test_context_rule_lives_in_one_place() -> None:
    gen = BatchGenerator(tiny_model("qwen2"), max_context=10)
    with pytest.raises(ContextLengthError, match="context of 10"):
        gen.submit(GenerationRequest([1] * 8, greedy(3)))
    gen.submit(GenerationRequest([1] * 7, greedy(3)))


def stop_after(model: BaseModel, prompt: list[int], **kw: object) -> tuple[str, str | None, int]:
    gen = BatchGenerator(model, max_batch=1)
    s = gen.submit(GenerationRequest(prompt, SamplingParams(temperature=0, ignore_eos=True, **kw)))  # type: ignore[arg-type]
    outs = collect(gen)[s.seq_id]
    assert "".join(o.text for o in outs) == s.text
    return s.text, s.finish_reason, len(s.generated)


def test_stop_strings_and_min_tokens_hold_them_off() -> None:
    model = toy_model(seed=1)
    prompt = [CHARS.index(c) for c in "hello"]
    free, _, _ = stop_after(model, prompt, max_tokens=12)
    stop = free[2]  # a character the model produces at its third token
    text, reason, n = stop_after(model, prompt, max_tokens=12, stop=(stop,))
    assert (text, reason) == (free[:free.index(stop)], "stop")
    text, reason, n = stop_after(model, prompt, max_tokens=12, stop=(stop,), min_tokens=6)
    later = free.find(stop, 5)  # the stop may only match from the 6th token on
    assert n >= 6
    if later >= 0:
        assert (text, reason) == (free[:later], "stop")
    else:
        assert (text, reason) == (free, "length")


def test_stop_string_holdback_streams_only_what_cannot_start_a_stop() -> None:
    st = StopStrings(["abc", "xyz"])
    assert st.held("hello ab") == 2 and st.held("hello a") == 1 and st.held("hello") == 0
    assert st.find("__ab", 3) is None and st.find("__abc", 4) == 2
    assert st.find("abc then more", 5) is None  # a match wholly inside the old text is not new


def test_fallback_detokenizer_equals_full_decode() -> None:
    tok = toy_model().tokenizer
    ids = [CHARS.index(c) for c in "Hi, there!"]
    det = IncrementalDetokenizer(tok, [1, 2])
    assert "".join(det.step(i)[0] for i in ids) == "Hi, there!"


def test_tokens_without_text_need_no_transformers_tokenizer() -> None:
    """Regression: a sampled token whose text is empty (EOS under ignore_eos, an id past the toy vocabulary)
    asked the tokenizer for `convert_ids_to_tokens`, which a plain tokenizer lacks: a random 500 in the API
    tests, whenever sampling drew such a token."""
    tok = toy_model().tokenizer
    assert not hasattr(tok, "convert_ids_to_tokens")
    names = TokenNames(tok)
    det = IncrementalDetokenizer(tok, [1, 2], names=names)
    ids = [CHARS.index("a"), 95, 120, CHARS.index("b")]  # 95: EOS; 120: no character
    assert [det.step(i) for i in ids] == [("a", 0), ("", 1), ("", 1), ("b", 1)]
    assert names.token_bytes(95) is None and names.name(CHARS.index("a")) == "a"


# --- the default model's byte-level tokenizer ------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(default_model: BaseModel) -> object:
    return default_model.tokenizer


def test_incremental_detokenization_holds_split_characters(tok) -> None:  # noqa: ANN001
    text = "Hello 😀 world, naïve café — 日本語 🎉!"
    ids = tok(text)["input_ids"]
    det = IncrementalDetokenizer(tok, tok("Prompt:")["input_ids"])
    pieces = [det.step(i)[0] for i in ids]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # some token only completes a character later


def test_byte_tokens_offsets_count_characters_of_the_text(tok) -> None:  # noqa: ANN001
    text = "Hello 😀 world"
    ids = tok(text)["input_ids"]
    decoded, offsets = decode_with_offsets(tok, ids)
    assert decoded == text
    assert offsets == [0, 5, 6, 7]  # the emoji's last byte starts inside it (index 6)
    assert text[offsets[-1]:] == " world"
    names = TokenNames(tok)
    assert [names.name(i) for i in ids] == ["Hello", "bytes:\\x20\\xf0\\x9f\\x98", "bytes:\\x80", " world"]


def test_every_token_of_the_vocabulary_has_its_own_name(tok) -> None:  # noqa: ANN001
    names = TokenNames(tok)
    all_names = [names.name(i) for i in range(len(tok))]
    assert len(set(all_names)) == len(all_names)
    assert names.names([5, 5, 7]) == [names.name(5), names.name(5), names.name(7)]


# --- layer-major chunked prefill -------------------------------------------------------------------------
def chunked(model: BaseModel, planner: object = None, **kw: object) -> BatchGenerator:
    return BatchGenerator(model, max_batch=3, planner=planner, long_prompt=8, chunk_tokens=5,  # type: ignore[arg-type]
                          prefill_budget=12, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_equals_one_prefill(arch: str, device: str) -> None:
    model = tiny_model(arch, device=device)
    prompt = [(7 * i + 3) % 96 for i in range(23)]
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=2, ignore_eos=True)
    for planner_of in (lambda: None, lambda: RouterPlanner(random_routers(model, 2))):
        for budget in (None, 0.5):
            req = GenerationRequest(prompt, params, budget=budget, prompt_logprobs=True)
            whole = BatchGenerator(model, max_batch=3, planner=planner_of())
            a = whole.submit(req)
            whole.run_to_completion()
            gen = chunked(model, planner_of())
            b = gen.submit(req)
            steps = 0
            while gen.has_work():
                gen.step()
                steps += 1
            assert steps > 5 + 3  # the prefill took several steps
            assert b.plan == a.plan and b.generated == a.generated
            torch.testing.assert_close(torch.tensor([x.logprob for x in b.logprobs]),
                                       torch.tensor([x.logprob for x in a.logprobs]), atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor([x.logprob for x in b.prompt_logprobs[1:]]),
                                       torch.tensor([x.logprob for x in a.prompt_logprobs[1:]]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_running_streams_keep_their_pace_during_a_chunked_prefill(device: str) -> None:
    model = tiny_model("qwen2", device=device)
    short = GenerationRequest([1, 2, 3], greedy(80))  # outlasts the prefill even at one chunk per step (49)
    long = GenerationRequest([(5 * i) % 96 for i in range(40)], greedy(4))
    gen = chunked(model)
    s = gen.submit(short)
    gen.step()  # admitted
    t = gen.submit(long)
    per_step = []
    while not t.generated:
        outs = gen.step()
        per_step.append(sum(len(o.token_ids) for o in outs if o.seq_id == s.seq_id))
    assert len(per_step) > 4 and all(n == 1 for n in per_step)  # a token every step of the long prefill
    gen.run_to_completion()
    assert s.generated == run_alone(model, short) and t.generated == run_alone(model, long)


def test_aborting_a_chunked_prefill_frees_it() -> None:
    model = tiny_model("llama")
    gen = chunked(model)
    t = gen.submit(GenerationRequest(list(range(40)), greedy(4)))
    gen.step()
    gen.step()
    gen.abort(t)
    outs = gen.step()
    assert [o.finish_reason for o in outs if o.seq_id == t.seq_id] == ["abort"]
    assert not gen.has_work()
    after = GenerationRequest(list(range(30)), greedy(3))
    u = gen.submit(after)
    gen.run_to_completion()
    assert u.generated == run_alone(model, after)


def _sliced_prefill(n: int, chunk: int, budget: float, time_budget: float | None = None
                    ) -> tuple[list[list[tuple[int, int]]], object, torch.Tensor]:
    """One LayerMajorExecutor prefill of n tokens: the (layer, offset) of the chunks of every slice."""
    model = tiny_model("llama")
    inner = RoutedExecutor(model, max_batch=1)
    slices: list[list[tuple[int, int]]] = [[]]
    real = inner.forward

    def forward(tokens, start, **kw):  # noqa: ANN001, ANN003, ANN202
        slices[-1].append((kw["resume"][0], int(start[0])))
        return real(tokens, start, **kw)

    inner.forward = forward  # type: ignore[method-assign]
    ex = LayerMajorExecutor(inner, lambda: slices.append([]), chunk, budget, lambda: time_budget)
    tokens = torch.tensor([[(3 * i + 1) % 96 for i in range(n)]])
    plans = torch.ones(1, model.spec.n_layers, dtype=torch.long)
    out = ex.forward(tokens, torch.zeros(1, dtype=torch.long), plans=plans)
    whole = RoutedExecutor(model, max_batch=1).forward(tokens, torch.zeros(1, dtype=torch.long), plans=plans)
    torch.testing.assert_close(out.logits, whole.logits, atol=1e-4, rtol=0)
    return slices, ex, tokens


def test_chunked_prefill_slices_are_sized_by_cost() -> None:
    """A chunk's cost grows with the keys it attends to: no slice goes over its budget (unless it holds a
    single chunk), and slices late in a block hold fewer chunks than early ones."""
    chunk, budget = 4, 40.0
    slices, ex, _ = _sliced_prefill(400, chunk, budget)
    assert not slices[-1]  # the prefill pauses once more before it returns
    for s in slices[:-1]:
        units = sum(ex.cost(1, chunk, off + chunk / 2) for _, off in s)  # type: ignore[attr-defined]
        assert len(s) == 1 or units <= budget + 1e-9
    layer0 = [s for s in slices if s and all(layer == 0 for layer, _ in s)]
    assert len(layer0[0]) > len(layer0[-2]) >= 1


def test_chunked_prefill_pauses_once_the_time_budget_is_spent() -> None:
    """With a time budget shorter than any chunk, every slice runs exactly one chunk (never two)."""
    slices, _, _ = _sliced_prefill(60, 4, 1e9, time_budget=1e-9)
    assert all(len(s) == 1 for s in slices[:-1]) and not slices[-1]
