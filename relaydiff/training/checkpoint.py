"""A run directory's checkpoints (docs/CONTRACTS.md, "Checkpoints").

``checkpoints/step-XXXXXXX.safetensors`` (model + EMA weights, metadata), beside it
``step-XXXXXXX.state.pt`` (optimizer, loss scaler, per-process RNG states, data position),
and ``checkpoints/latest`` naming the newest complete pair. Each file is written atomically
and ``latest`` last, so an interrupted save leaves the previous checkpoint in force.
"""
from __future__ import annotations

import os
import pathlib
import re
import zipfile
from typing import Any

import torch

from relaydiff.models.checkpoint import (LATEST, atomic_write, read_latest, read_meta, remove_stale_temporaries,
                                         save_weights)
from relaydiff.zipsizes import TORCH_MAX_RATIO, DeclaredSizeError, check_archive

_NAME = re.compile(r"^step-(\d{7,})\.safetensors$")


def checkpoint_dir(run_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(run_dir) / "checkpoints"


def _state_path(weights: pathlib.Path) -> pathlib.Path:
    return weights.with_name(weights.name[: -len(".safetensors")] + ".state.pt")


def save_checkpoint(run_dir: pathlib.Path, step: int, model: torch.nn.Module, ema: torch.nn.Module,
                    meta: dict[str, Any], state: dict[str, Any], keep: int = 0) -> pathlib.Path:
    """Write step ``step``'s weights and training state, then point ``latest`` at them and
    delete all but the newest ``keep`` checkpoints (0: keep all) and the temporary files of
    writes a killed process left behind."""
    d = checkpoint_dir(run_dir)
    weights = d / f"step-{step:07d}.safetensors"
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    save_weights(weights, tensors, meta)
    atomic_write(_state_path(weights), lambda tmp: torch.save(state, tmp))
    atomic_write(d / LATEST, lambda tmp: pathlib.Path(tmp).write_text(weights.name + "\n"))
    remove_stale_temporaries(d)   # one process writes a run's checkpoints: any .tmp left is a dead write's
    if keep:
        old = sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name)[1]))
        for p in old[:-keep]:
            if p != weights:
                _state_path(p).unlink(missing_ok=True)
                p.unlink(missing_ok=True)
    return weights


def latest_checkpoint(run_dir: pathlib.Path) -> pathlib.Path | None:
    """The weights file ``checkpoints/latest`` names, or None when there is none."""
    latest = checkpoint_dir(run_dir) / LATEST
    if not latest.is_file():
        return None
    weights = read_latest(checkpoint_dir(run_dir))
    if not weights.is_file() or not _state_path(weights).is_file():
        raise FileNotFoundError(f"{latest} names {weights.name}, but it or its .state.pt is missing")
    return weights


def _check_state_file(path: pathlib.Path) -> None:
    """Refuse a ``.state.pt`` whose zip directory declares more than the file can hold, before
    ``torch.load`` reserves (and inflates) what it declares: torch.save stores every member
    uncompressed, so a genuine file's members inflate to less than the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            check_archive(zf, os.path.getsize(path), max_ratio=TORCH_MAX_RATIO)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a training state written by torch.save ({e})") from None
    except DeclaredSizeError as e:
        raise ValueError(f"{path} is not a training state written by torch.save: {e}") from None


def load_checkpoint(weights: pathlib.Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(tensors, meta, state)`` of a checkpoint written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file
    meta = read_meta(weights)
    _check_state_file(_state_path(weights))
    state = torch.load(_state_path(weights), map_location="cpu", weights_only=True)
    return load_file(str(weights)), meta, state
