"""Reading and writing relaydiff weight files (docs/CONTRACTS.md, "Checkpoints").

A weight file is a safetensors file with tensors ``model.<name>`` and/or ``ema.<name>`` (the
state dict of an :class:`~relaydiff.models.EDMPrecond`) and the metadata key ``"relaydiff"``
holding JSON: ``{"format": 1, "stage", "network", "precond", "relay", "step", "kimg",
"resolution", "label_dim"}``. A run directory names its newest checkpoint in
``checkpoints/latest``.
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable

import torch

from .precond import EDMPrecond
from .presets import build_model

FORMAT = 1
META_KEY = "relaydiff"
LATEST = "latest"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> pathlib.Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` then rename it to ``path``,
    so a crash mid-write leaves either the old file or the new one, never a torn one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> pathlib.Path:
    """Write ``tensors`` (``model.*``/``ema.*``) and ``meta`` as one safetensors file, atomically."""
    from safetensors.torch import save_file
    meta = {"format": FORMAT, **meta}
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={META_KEY: json.dumps(meta)}))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``"relaydiff"`` metadata of a weight file (no tensors are read)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path}: not a relaydiff weight file (no {META_KEY!r} metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported relaydiff weight format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """A weight file for ``path``: the file itself, or a run directory's newest checkpoint."""
    path = pathlib.Path(path)
    if path.is_dir():
        latest = path / "checkpoints" / LATEST
        if not latest.is_file():
            raise FileNotFoundError(f"{path}: no checkpoints/{LATEST} (not a relaydiff run directory, "
                                    "or no checkpoint written yet)")
        return path / "checkpoints" / latest.read_text().strip()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or run directory")
    return path


def load_model(path: str | os.PathLike, which: str = "ema", device="cpu") -> tuple[EDMPrecond, dict[str, Any]]:
    """Load a denoiser from a run directory (its newest checkpoint), a checkpoint file or a
    converted release. ``which``: ``"ema"`` (the averaged weights, for sampling) or ``"model"``
    (the raw training weights). Returns ``(EDMPrecond in eval mode, meta)``; ``meta`` is the
    file's metadata dict (``meta["relay"]`` is ``RelayConfig.to_dict()`` or None)."""
    from safetensors.torch import load_file
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model'; got {which!r}")
    file = resolve_checkpoint(path)
    meta = read_meta(file)
    tensors = load_file(str(file))
    prefix = which + "."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        have = sorted({k.split(".", 1)[0] for k in tensors})
        raise ValueError(f"{file}: no {which!r} weights in this file (it holds {have})")
    model = build_model(meta["network"], meta.get("precond"))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False), meta
