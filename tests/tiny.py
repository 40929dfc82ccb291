"""Tiny random models of each supported architecture, and an independent transformers reference.

DRLLM_TEST_DEVICE (default cpu) and DRLLM_TEST_DTYPE (default float32) move every tiny model, so the
model-side tests run on CUDA and in bfloat16/float16 too (bench/gpu_check.sh); ATOL follows the dtype.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from routing.model import BaseModel, wrap_model
from routing.plan import LayerPlan
from routing.router_net import RouterConfig, Routers

ARCHS = ("llama", "qwen2", "qwen3")
DEVICE = torch.device(os.environ.get("DRLLM_TEST_DEVICE", "cpu"))
# for tests parametrized on the device: CPU, and CUDA where there is one (skipped, not dropped, without)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
    os.environ.get("DRLLM_TEST_DTYPE", "float32")]
# logits of the tiny models are O(1): float32 agrees to ~1e-6, half precisions to a few of their epsilons
# accumulated over 6 blocks
ATOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}[DTYPE]
LOW_PRECISION = DTYPE != torch.float32
_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa", device: str | torch.device | None = None) -> BaseModel:
    """A random 6-block model of `arch` on `device` (default DRLLM_TEST_DEVICE) in DRLLM_TEST_DTYPE."""
    torch.manual_seed(seed)
    if arch == "llama":
        hf = LlamaForCausalLM(LlamaConfig(**_COMMON, attn_implementation=attn))
    elif arch == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**_COMMON, attn_implementation=attn))
    elif arch == "qwen3":
        hf = Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=24, attn_implementation=attn))
    else:
        raise ValueError(arch)
    # random init leaves norms at 1 and biases at 0: perturb them so the test sees every parameter
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.to(DEVICE if device is None else device, DTYPE)
    return wrap_model(hf, name=f"tiny-{arch}")


def reference_logits(model: BaseModel, plan: LayerPlan, tokens: torch.Tensor) -> torch.Tensor:
    """Plain transformers forward (no cache) through the blocks in the plan's execution order."""
    # shallow copies with their own submodule tables: the original model is left untouched
    hf = copy.copy(model.hf)
    hf._modules = dict(hf._modules)
    inner = copy.copy(hf.model)
    inner._modules = dict(inner._modules)
    layers = model.layers
    inner.layers = nn.ModuleList([layers[i] for i in plan.execution_order])
    inner.config = copy.deepcopy(inner.config)
    inner.config.num_hidden_layers = len(plan.execution_order)
    if getattr(inner.config, "layer_types", None) is not None:
        inner.config.layer_types = [inner.config.layer_types[i] for i in plan.execution_order]
    hf.model = inner
    with torch.inference_mode():
        return hf(tokens.to(model.device), use_cache=False).logits


def random_routers(model: BaseModel, seed: int) -> Routers:
    """Decisive random routers: their plans both skip and repeat."""
    torch.manual_seed(seed)
    r = Routers(RouterConfig(n_layers=model.spec.n_layers, hidden_size=model.spec.hidden_size))
    with torch.no_grad():
        for layer in r.layers:
            layer.fc2.weight.mul_(40)
    return r.to(model.device).eval()
