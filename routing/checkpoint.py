"""Router checkpoints: a directory with `routers.safetensors` and `router.json`, bound to one base model.

router.json holds the format version, the router hyper-parameters, the identity of the base model
(architecture, L, hidden size, weights fingerprint), the sha256 of the tensor file, and the training
provenance and evaluation summary written by the pipeline. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import router_kernel
from .model import BaseModel
from .paths import routers_dir
from .plan import DECISIONS
from .policy import RoutingPolicy
from .router_net import RouterConfig, Routers

FORMAT_VERSION = 1
TENSORS, META = "routers.safetensors", "router.json"
CLASSES = list(DECISIONS)


class RouterCheckpointError(ValueError):
    """A router checkpoint is missing, corrupted, of an unknown format, or for another base model."""


def base_identity(model: BaseModel) -> dict[str, Any]:
    s = model.spec
    return {"name": model.name, "architecture": s.architecture, "n_layers": s.n_layers,
            "hidden_size": s.hidden_size, "fingerprint": model.fingerprint}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in blocks), for provenance and corruption checks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_routers(directory: str | Path, routers: Routers, model: BaseModel,
                 training: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
                 default: bool = False, policy: dict[str, Any] | None = None) -> Path:
    """Write `routers` for `model` into `directory`. policy: the routing policy (guard thresholds, budget
    rule; see `routing.routers.RoutingPolicy.to_dict`) stored in router.json; None keeps argmax routing."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in routers.state_dict().items()}
    save_file(state, str(d / TENSORS), metadata={"format_version": str(FORMAT_VERSION)})
    c = routers.config
    meta = {
        "format_version": FORMAT_VERSION,
        "router": {"window": c.window, "bottleneck": c.bottleneck, "classes": CLASSES},
        "base_model": base_identity(model),
        "tensors_sha256": sha256_file(d / TENSORS),
        "default": default,
        "policy": policy or {},
        "training": training or {},
        "evaluation": evaluation or {},
    }
    (d / META).write_text(json.dumps(meta, indent=2) + "\n")
    return d


def update_meta(directory: Path, **fields: Any) -> None:
    """Set top-level fields of a checkpoint's router.json (e.g. the calibrated `policy`); the tensors and
    their sha256 are untouched. Raises RouterCheckpointError for a missing or corrupted router.json."""
    meta = read_meta(directory)
    meta.update(fields)
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META
    if not path.is_file():
        raise RouterCheckpointError(f"{directory} is not a router checkpoint: {META} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RouterCheckpointError(f"{path} is corrupted: {e}") from e
    if not isinstance(meta, dict):
        raise RouterCheckpointError(f"{path} is corrupted: not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise RouterCheckpointError(
            f"{path}: unknown router format version {meta.get('format_version')!r} (this drllm reads {FORMAT_VERSION})")
    return meta


def check_base(meta: dict[str, Any], model: BaseModel, where: Path) -> None:
    want, have = meta.get("base_model", {}), base_identity(model)
    for key in ("architecture", "n_layers", "hidden_size", "fingerprint"):
        if want.get(key) != have[key]:
            raise RouterCheckpointError(
                f"router checkpoint {where} was trained for another base model: {key} is "
                f"{want.get(key)!r} there but {have[key]!r} for {model.name}")


def find_default(model: BaseModel, root: Path | None = None) -> Path:
    """The shipped checkpoint for this base model (matching fingerprint; one marked default wins)."""
    root = root or routers_dir()
    matches = []
    for meta_path in sorted(root.glob(f"*/{META}")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("base_model", {}).get("fingerprint") == model.fingerprint:
            matches.append((not meta.get("default", False), meta_path.parent))
    if not matches:
        raise RouterCheckpointError(
            f"no router checkpoint is shipped for base model {model.name} (fingerprint {model.fingerprint}) "
            f"in {root}; train one with `drllm search` and `drllm train`, or run without routers")
    return min(matches)[1]


def load_routers(spec: str | Path, model: BaseModel) -> Routers:
    """Load routers from a checkpoint directory, or `default` (the shipped one for this base model), on the
    model's device, for inference. On the CPU this also builds the fused router kernel (`router_kernel`).
    Raises RouterCheckpointError for a missing, corrupted or mismatched checkpoint."""
    d = find_default(model) if str(spec) == "default" else Path(spec)
    if not d.is_dir():
        raise RouterCheckpointError(f"router checkpoint directory not found: {d}")
    meta = read_meta(d)
    check_base(meta, model, d)
    tensors = d / TENSORS
    if not tensors.is_file():
        raise RouterCheckpointError(f"{d} is not a router checkpoint: {TENSORS} is missing")
    if meta.get("tensors_sha256") and sha256_file(tensors) != meta["tensors_sha256"]:
        raise RouterCheckpointError(f"{tensors} is corrupted: its sha256 does not match {META}")
    try:
        state = load_file(str(tensors))
    except (SafetensorError, OSError, ValueError) as e:
        raise RouterCheckpointError(f"{tensors} is corrupted: {e}") from e
    r = meta.get("router", {})
    config = RouterConfig(n_layers=model.spec.n_layers, hidden_size=model.spec.hidden_size,
                          window=int(r.get("window", 8)), bottleneck=int(r.get("bottleneck", 128)),
                          n_classes=len(r.get("classes", CLASSES)))
    routers = Routers(config)
    try:
        routers.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RouterCheckpointError(f"{tensors} does not fit the router configuration: {e}") from e
    try:
        routers.policy = RoutingPolicy.from_dict(meta.get("policy"))
    except (TypeError, ValueError) as e:
        raise RouterCheckpointError(f"{d / META}: invalid routing policy: {e}") from e
    if model.device.type == "cpu":
        router_kernel.load()  # build the fused CPU kernel now, not inside the first routed prefill
    return routers.to(model.device).eval().requires_grad_(False)
