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
TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> pathlib.Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` then rename it to ``path``,
    so a crash mid-write leaves either the old file or the new one, never a torn one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp, os.O_RDONLY)   # the data reaches the disk before the name does
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))   # and the rename itself
    return path


def _fsync(path, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:   # a folder cannot be opened on some platforms (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:   # file systems without fsync on folders
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` when a process was
    killed mid-write (``.<name>.<random>.tmp``). Only for a folder one process writes to."""
    gone = []
    for p in pathlib.Path(folder).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def save_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> pathlib.Path:
    """Write ``tensors`` (``model.*``/``ema.*``) and ``meta`` as one safetensors file, atomically."""
    from safetensors.torch import save_file
    meta = {"format": FORMAT, **meta}
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={META_KEY: json.dumps(meta)}))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``"relaydiff"`` metadata of a weight file (no tensors are read)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors weight file ({e})") from None
    if raw is None:
        raise ValueError(f"{path}: not a relaydiff weight file (no {META_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: malformed {META_KEY!r} metadata ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: malformed {META_KEY!r} metadata (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported relaydiff weight format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """A weight file for ``path``: the file itself, or a run directory's newest checkpoint."""
    path = pathlib.Path(path)
    if path.is_dir():
        if not (path / "checkpoints" / LATEST).is_file():
            raise FileNotFoundError(f"{path}: no checkpoints/{LATEST} (not a relaydiff run directory, "
                                    "or no checkpoint written yet)")
        return read_latest(path / "checkpoints")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or run directory")
    return path


def read_latest(folder: str | os.PathLike) -> pathlib.Path:
    """The checkpoint ``folder/latest`` names. It must be a plain file name: an absolute path or
    one with a folder part (``..``) is refused, so a run directory cannot point outside itself."""
    latest = pathlib.Path(folder) / LATEST
    with open(latest, "rb") as f:
        raw = f.read(4097)
    try:
        name = raw.decode().strip()
    except UnicodeDecodeError:
        name = None
    if not name or len(raw) > 4096 or pathlib.PurePath(name).name != name or name in (".", "..") \
            or os.sep in name or "/" in name:
        shown = name if name is not None else raw[:40]
        raise ValueError(f"{latest} names {shown!r}; expected the file name of a checkpoint beside it")
    return latest.parent / name


def declared_model(network, precond, n_tensors: int, file) -> EDMPrecond:
    """The model a file's metadata declares, built on the meta device: parameter shapes
    without memory, to compare with the file's tensors before anything real is allocated."""
    if not isinstance(network, dict) or not isinstance(precond, (dict, type(None))):
        raise ValueError(f"{file}: malformed metadata (network/precond must be JSON objects)")
    blocks, mult = network.get("num_blocks", 0), network.get("channel_mult", ())
    # every block holds tensors: a file with n tensors cannot describe more blocks than that
    if isinstance(blocks, int) and isinstance(mult, (list, tuple)) and (blocks + 1) * len(mult) > n_tensors:
        raise ValueError(f"{file}: the metadata declare {len(mult)} levels of {blocks} blocks, but the "
                         f"file holds only {n_tensors} tensors")
    try:
        with torch.device("meta"):
            return build_model(network, precond)
    except Exception as e:   # arguments from a file: any type may be wrong
        raise ValueError(f"{file}: the network the metadata declare cannot be built "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def load_model(path: str | os.PathLike, which: str = "ema", device="cpu") -> tuple[EDMPrecond, dict[str, Any]]:
    """Load a denoiser from a run directory (its newest checkpoint), a checkpoint file or a
    converted release. ``which``: ``"ema"`` (the averaged weights, for sampling) or ``"model"``
    (the raw training weights). Returns ``(EDMPrecond in eval mode, meta)``; ``meta`` is the
    file's metadata dict (``meta["relay"]`` is ``RelayConfig.to_dict()`` or None).

    The architecture the metadata declare is checked against the file's tensors (names and
    shapes, on the meta device) before the model is built, so a small file cannot make this
    allocate more than its tensors hold. Raises ``ValueError`` naming the file otherwise."""
    from safetensors import safe_open

    from .convert import _check_names
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model'; got {which!r}")
    file = resolve_checkpoint(path)
    meta = read_meta(file)
    prefix = which + "."
    with safe_open(str(file), framework="pt") as f:
        names = list(f.keys())
        ours = [k for k in names if k.startswith(prefix)]
        if not ours:
            have = sorted({k.split(".", 1)[0] for k in names})
            raise ValueError(f"{file}: no {which!r} weights in this file (it holds {have})")
        found = {k[len(prefix):]: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in ours}
        expected = declared_model(meta.get("network"), meta.get("precond"), len(found), file).state_dict()
        try:
            _check_names(found, expected)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        model = build_model(meta["network"], meta.get("precond"))
        model.load_state_dict({k[len(prefix):]: f.get_tensor(k) for k in ours}, strict=True)
    return model.to(device).eval().requires_grad_(False), meta
