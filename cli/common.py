"""Options several commands share."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="HF directory, .gguf file, hub id, or 'default'")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--quantization", default="none", choices=("none", "int8", "int4"),
                   help="CPU only. int8: per-channel int8 weights for the blocks and LM head; int4: groups of 32 "
                        "(as GGUF's Q4_1) for the blocks, the LM head int8")
