"""Convert the released EDM and RDM checkpoints into relaydiff weight files (docs/pretrained.md).

Sources (read by :mod:`relaydiff.models.safe_pickle`, which runs no code from the file):

* EDM network pickles (``.pkl``): ``{"ema": EDMPrecond, "loss_fn", "augment_pipe",
  "dataset_kwargs"}``, e.g. ``edm-imagenet-64x64-cond-adm.pkl`` (the ImageNet stage 1 of RDM);
* RDM training states (``.pt``, torch zip): ``{"net", "ema", "optimizer_state", "step"}``
  (the CelebA-HQ stages and the ImageNet relay stage). Only ``ema`` is read.

The recorded ``EDMPrecond`` constructor arguments give the U-Net (``model_type`` must be
``DhariwalUNet``, SPEC 8) and the preconditioning (SPEC 5); EDM's parameter names are
relaydiff's, so every tensor maps one to one and any missing, unexpected or mis-shaped name
is reported. The result is one safetensors file with tensors ``ema.<name>`` and the
``"relaydiff"`` metadata of docs/CONTRACTS.md ("Checkpoints"), loadable by
:func:`~relaydiff.models.load_model` and :func:`load_pretrained`;
:func:`convert_checkpoint` writes it, :func:`convert_release` converts in memory.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
import pathlib
from typing import Any

import torch

from ..config import RelayConfig
from .checkpoint import load_model, save_weights
from .precond import EDMPrecond
from .presets import build_model
from .safe_pickle import ObjectRecord, PersistentRecord, TensorRef, open_checkpoint
from .unet import DhariwalUNet

# EDM's EDMPrecond(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max,
# sigma_data, model_type, **model_kwargs), in positional order
_EDM_PRECOND_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                     "sigma_data", "model_type")
# U-Net keywords of the authors' code that change how, not what, it computes
_IGNORED_KWARGS = ("eff_attn",)   # RDM: xformers attention instead of EDM's einsum
# The relay settings of the released RDM stages (SPEC 9). The authors trained them with
# un-normalised mixed noise (SPEC 3, code variant), so that is what reproduces them.
RELAY_PRESETS = {"imagenet256": RelayConfig.imagenet256, "celebahq256": RelayConfig.celebahq256}
STAGES = ("base", "relay")


class ConversionError(ValueError):
    """The source cannot become a relaydiff model. ``missing`` / ``unexpected`` / ``mismatched``
    list the offending tensor names (``mismatched``: ``(name, shape in file, shape expected)``)."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


def released_relay_config(name: str) -> RelayConfig:
    """The :class:`RelayConfig` of a released RDM relay stage: ``"imagenet256"`` or ``"celebahq256"``."""
    try:
        return RELAY_PRESETS[name](normalize_noise=False)
    except KeyError:
        raise ValueError(f"unknown relay preset {name!r}; choose one of {', '.join(RELAY_PRESETS)}") from None


def _relay_from_blur_loss(loss: PersistentRecord) -> RelayConfig:
    """RDM's ``BlurLoss`` attributes -> :class:`RelayConfig` (its ``up_scale`` is both the patch
    and the block size; ``block_scale`` is alpha; ``prob_length`` the truncation)."""
    s = loss.state
    try:
        return RelayConfig(patch_size=int(s["up_scale"]), block_size=int(s["up_scale"]),
                           alpha=float(s["block_scale"]), truncation=float(s["prob_length"]),
                           blur_sigma_max=float(s["blur_sigma_max"]), min_scale=float(s["min_scale"]),
                           p_mean=float(s["P_mean"]), p_std=float(s["P_std"]), normalize_noise=False)
    except KeyError as e:
        raise ConversionError(f"the file's BlurLoss lacks the attribute {e.args[0]!r}") from None


def module_tensors(record, prefix: str = "") -> dict[str, TensorRef]:
    """The state-dict entries (parameters and persistent buffers) of a recorded module tree."""
    if not isinstance(record, (PersistentRecord, ObjectRecord)) or not isinstance(record.state, dict):
        raise ConversionError(f"{prefix or 'the network'} is a {type(record).__name__}, not a module")
    state = record.state
    skip = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, TensorRef] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, TensorRef):
                raise ConversionError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(f"EDMPrecond argument {name}={value!r} is not an integer")
    return value


def _json_value(v):
    if isinstance(v, (tuple, list)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def edm_config(ema: PersistentRecord) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(network, precond, source)`` from a recorded EDM ``EDMPrecond``: the
    :class:`DhariwalUNet` keywords (JSON-friendly), ``EDMPrecond.config()`` keywords and facts
    about the source (``use_fp16``, the recorded keywords, dropped ones)."""
    if not isinstance(ema, PersistentRecord):
        raise ConversionError(f"the 'ema' entry is a {type(ema).__name__}, not an EDM network")
    if ema.class_name != "EDMPrecond":
        raise ConversionError(f"the network is an EDM {ema.class_name}; relaydiff converts EDMPrecond "
                              "networks only (VP, VE and iDDPM preconditioning are not implemented)")
    args, kwargs = ema.init_args or (), ema.init_kwargs
    if kwargs is None or not isinstance(kwargs, dict):
        raise ConversionError("the EDMPrecond was saved without its constructor arguments (_init_kwargs)")
    if len(args) > len(_EDM_PRECOND_ARGS):
        raise ConversionError(f"EDMPrecond has {len(args)} positional arguments (at most {len(_EDM_PRECOND_ARGS)})")
    kw = dict(zip(_EDM_PRECOND_ARGS, args))
    twice = sorted(set(kw) & set(kwargs))
    if twice:
        raise ConversionError(f"EDMPrecond arguments given twice: {twice}")
    kw.update(kwargs)
    recorded = _json_value(kw)

    model_type = kw.pop("model_type", "DhariwalUNet")
    if model_type != "DhariwalUNet":
        raise ConversionError(f"the network's model_type is {model_type!r}; relaydiff implements DhariwalUNet "
                              "(ADM) only")
    for name in ("img_resolution", "img_channels"):
        if name not in kw:
            raise ConversionError(f"the EDMPrecond arguments lack {name!r}")
    resolution, channels = _int("img_resolution", kw.pop("img_resolution")), _int("img_channels", kw.pop("img_channels"))
    label_dim = _int("label_dim", kw.pop("label_dim", 0))
    use_fp16 = bool(kw.pop("use_fp16", False))
    precond = dict(sigma_data=float(kw.pop("sigma_data", 0.5)), sigma_min=float(kw.pop("sigma_min", 0.0)),
                   sigma_max=float(kw.pop("sigma_max", math.inf)))
    dropped = {k: _json_value(kw.pop(k)) for k in _IGNORED_KWARGS if k in kw}

    params = inspect.signature(DhariwalUNet).parameters
    fixed = {"img_resolution", "in_channels", "out_channels", "label_dim"}   # set from EDMPrecond's own
    unknown = sorted(set(kw) - (set(params) - fixed))
    if unknown:
        raise ConversionError(f"DhariwalUNet keyword(s) relaydiff does not implement: {unknown}")
    # relaydiff's DhariwalUNet defaults are EDM's; written out so the file describes itself
    network = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    network.update(img_resolution=resolution, in_channels=channels, out_channels=channels, label_dim=label_dim, **kw)
    network = {k: _json_value(v) for k, v in network.items()}
    source = dict(class_name=ema.class_name, use_fp16=use_fp16, init_kwargs=recorded, dropped_kwargs=dropped,
                  module_src_sha256=hashlib.sha256(ema.module_src.encode()).hexdigest())
    return network, precond, source


def _check_names(found: dict[str, TensorRef], expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [(k, found[k].shape, tuple(expected[k].shape)) for k in sorted(set(found) & set(expected))
                  if tuple(found[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return

    def show(items, fmt=str, limit=10):
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(fmt(x) for x in items[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {show(unexpected)}")
    if mismatched:
        parts.append(f"mis-shaped {len(mismatched)}: "
                     + show(mismatched, lambda m: f"{m[0]} {list(m[1])} (expected {list(m[2])})"))
    raise ConversionError("the file's tensors do not fit the network its arguments describe: " + "; ".join(parts),
                          missing, unexpected, mismatched)


def _resolve_stage(loss, stage: str | None, relay) -> tuple[str, RelayConfig | None]:
    if stage not in (None, *STAGES):
        raise ValueError(f"stage must be one of {STAGES} or None; got {stage!r}")
    if isinstance(relay, str):
        relay = released_relay_config(relay)
    if relay is not None and not isinstance(relay, RelayConfig):
        raise ValueError(f"relay must be a RelayConfig, a preset name or None; got {type(relay).__name__}")
    loss_name = loss.class_name if isinstance(loss, PersistentRecord) else None
    if relay is not None:
        if stage == "base":
            raise ValueError("a relay configuration was given for a base (stage 1) model")
        return "relay", relay
    if stage == "base" or (stage is None and loss_name == "EDMLoss"):
        return "base", None
    if loss_name == "BlurLoss":
        return "relay", _relay_from_blur_loss(loss)
    if stage == "relay":
        raise ValueError(f"this file holds no relay settings: name them (relay= one of {', '.join(RELAY_PRESETS)} "
                         "or a RelayConfig)")
    raise ValueError("cannot tell whether this file is a base (stage 1) or a relay model (an RDM .pt holds no "
                     f"loss settings): pass stage='base', or relay= one of {', '.join(RELAY_PRESETS)}")


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def convert_release(src: str | os.PathLike, stage: str | None = None, relay: RelayConfig | str | None = None,
                    progress: bool = False) -> tuple[EDMPrecond, dict[str, Any]]:
    """Read an EDM ``.pkl`` or RDM ``.pt`` (its ``ema`` network) into a relaydiff
    :class:`EDMPrecond` (eval mode, CPU, float32) and the metadata of a converted file.

    ``stage``: ``"base"`` / ``"relay"``; ``relay``: a :class:`RelayConfig` or one of
    :data:`RELAY_PRESETS` (implies ``stage="relay"``). Both are inferred from an EDM pickle's
    ``loss_fn`` (``EDMLoss``: base; RDM ``BlurLoss``: relay with its settings); an RDM ``.pt``
    carries no loss, so one of them is required there.

    Raises :class:`~relaydiff.models.safe_pickle.ForbiddenGlobal` for a file that names code
    outside the allow-list, :class:`ConversionError` for a network relaydiff cannot rebuild
    (by name: unsupported class or keyword, missing/unexpected/mis-shaped tensors)."""
    from tqdm.auto import tqdm
    src = pathlib.Path(src)
    with open_checkpoint(src, progress=progress) as (kind, top):
        if isinstance(top, dict) and "ema" in top:
            ema = top["ema"]
        elif isinstance(top, PersistentRecord):
            ema = top
        else:
            keys = sorted(map(str, top)) if isinstance(top, dict) else type(top).__name__
            raise ConversionError(f"no 'ema' network in this file (it holds {keys})")
        loss = top.get("loss_fn") if isinstance(top, dict) else None
        nimg = top.get("step") if isinstance(top, dict) and kind != "pickle" else None
        network, precond, source = edm_config(ema)
        stage, relay_cfg = _resolve_stage(loss, stage, relay)

        model = build_model(network, precond)
        targets = model.state_dict()   # the model's own parameters and buffers (shared storage)
        found = module_tensors(ema)
        _check_names(found, targets)
        buffers = {name for name, _ in model.named_buffers()}
        for name, ref in tqdm(found.items(), desc="tensors", unit="tensor", disable=not progress, leave=False):
            if not ref.dtype.is_floating_point:
                raise ConversionError(f"{name} is {ref.dtype} (expected {targets[name].dtype})")
            value = ref.load().to(targets[name].dtype)
            # buffers are constants of the architecture (the [1, 1] resampling filter): other
            # values would describe a network relaydiff does not compute
            if name in buffers and not torch.equal(value, targets[name]):
                raise ConversionError(f"buffer {name} differs from relaydiff's fixed value (a resampling "
                                      "filter other than [1, 1] is not implemented)")
            with torch.no_grad():
                targets[name].copy_(value)

    source.update(file=src.name, format=kind, sha256=_sha256(src),
                  nimg=nimg if isinstance(nimg, int) and not isinstance(nimg, bool) else None)
    meta = dict(stage=stage, network=network, precond=precond,
                relay=relay_cfg.to_dict() if relay_cfg is not None else None,
                step=0, kimg=source["nimg"] / 1000 if source["nimg"] is not None else 0.0,
                resolution=network["img_resolution"], label_dim=network["label_dim"], source=source)
    return model.eval().requires_grad_(False), meta


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, stage: str | None = None,
                       relay: RelayConfig | str | None = None,
                       progress: bool = False) -> tuple[pathlib.Path, dict[str, Any]]:
    """Convert ``src`` (see :func:`convert_release`) and write ``dst`` (``.safetensors``, atomically):
    tensors ``ema.<name>`` + the ``"relaydiff"`` metadata. Returns ``(dst, meta)``."""
    model, meta = convert_release(src, stage=stage, relay=relay, progress=progress)
    tensors = {f"ema.{k}": v for k, v in model.state_dict().items()}
    return save_weights(dst, tensors, meta), meta


def load_pretrained(path: str | os.PathLike, device="cpu", stage: str | None = None,
                    relay: RelayConfig | str | None = None) -> tuple[EDMPrecond, dict[str, Any]]:
    """A denoiser from a converted ``.safetensors`` file (or any file or run directory
    :func:`~relaydiff.models.load_model` reads: its EMA weights), or straight from an EDM
    ``.pkl`` / RDM ``.pt`` converted in memory (``stage``/``relay`` as in :func:`convert_release`).
    Returns ``(EDMPrecond in eval mode on device, meta)``."""
    path = pathlib.Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return load_model(path, which="ema", device=device)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    model, meta = convert_release(path, stage=stage, relay=relay)
    return model.to(device), meta
