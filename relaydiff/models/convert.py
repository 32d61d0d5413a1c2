"""Convert the released EDM and RDM checkpoints into relaydiff weight files (docs/pretrained.md).

Sources (read by :mod:`relaydiff.models.safe_pickle`, which runs no code from the file):

* EDM network pickles (``.pkl``): ``{"ema": <preconditioner>, "loss_fn", "augment_pipe",
  "dataset_kwargs"}``: every EDM release (``EDMPrecond``, ``VPPrecond``, ``VEPrecond``,
  ``iDDPMPrecond`` around ``DhariwalUNet`` or ``SongUNet``), among them
  ``edm-imagenet-64x64-cond-adm.pkl`` (the ImageNet stage 1 of RDM);
* RDM training states (``.pt``, torch zip): ``{"net", "ema", "optimizer_state", "step"}``
  (the CelebA-HQ stages and the ImageNet relay stage). Only ``ema`` is read.

The preconditioner's recorded constructor arguments give the network (``model_type``) and the
preconditioning (SPEC 5); EDM's parameter names are relaydiff's, so every tensor maps one to
one and any missing, unexpected or mis-shaped name is reported. Architecture constants that
EDM's source fixes rather than records (attention heads, normalisation groups and epsilon,
skip scaling ...) are read back from the recorded module attributes and must be the ones
relaydiff computes; an embedded source that is not one of the known released ones is
converted with a warning (docs/pretrained.md). The result is one safetensors file with
tensors ``ema.<name>`` and the ``"relaydiff"`` metadata of docs/CONTRACTS.md ("Checkpoints"), loadable by
:func:`~relaydiff.models.load_model` and :func:`load_pretrained`;
:func:`convert_checkpoint` writes it, :func:`convert_release` converts in memory.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
import pathlib
import warnings
from typing import Any

import torch

from ..config import RelayConfig
from .checkpoint import declared_model, load_model, save_weights
from .precond import Precond
from .presets import NETWORKS, build_model
from .safe_pickle import ObjectRecord, PersistentRecord, TensorRef, open_checkpoint

# EDM's preconditioners: Precond(img_resolution, img_channels, label_dim, use_fp16, *own,
# model_type, **model_kwargs). Per class: its own arguments in positional order with EDM's
# defaults (written out so a converted file describes itself), and its default model_type.
_EDM_PRECONDS: dict[str, tuple[dict[str, float], str]] = {
    "EDMPrecond": (dict(sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5), "DhariwalUNet"),
    "VPPrecond": (dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5), "SongUNet"),
    "VEPrecond": (dict(sigma_min=0.02, sigma_max=100.0), "SongUNet"),
    "iDDPMPrecond": (dict(C_1=0.001, C_2=0.008, M=1000), "DhariwalUNet"),
}
_COMMON_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16")
_BASE_LOSSES = ("EDMLoss", "VPLoss", "VELoss")   # EDM's training/loss.py
# U-Net keywords of the authors' code that change how, not what, it computes
_IGNORED_KWARGS = ("eff_attn",)   # RDM: xformers attention instead of EDM's einsum
# The relay settings of the released RDM stages (SPEC 9). The authors trained them with
# un-normalised mixed noise (SPEC 3, code variant), so that is what reproduces them.
RELAY_PRESETS = {"imagenet256": RelayConfig.imagenet256, "celebahq256": RelayConfig.celebahq256}
STAGES = ("base", "relay")
# SHA-256 of the network sources (EDM's training/networks.py and the RDM authors' copy) that
# the released files embed -> which release. A file embedding another source converts with a
# warning. Empty: no released file could be read where this was written, and the public
# repositories' networks.py need not be byte for byte what the pickles embed (docs/pretrained.md)
KNOWN_SOURCES: dict[str, str] = {}
# Module attributes that EDM's source sets from constants of its own rather than from the
# recorded arguments (e.g. DhariwalUNet's channels_per_head=64 -> UNetBlock.num_heads): a
# modified source shows here although its tensors have the same shapes
_ARCH_ATTRIBUTES = ("in_channels", "out_channels", "emb_channels", "num_heads", "skip_scale", "adaptive_scale",
                    "num_groups", "eps", "num_channels", "max_positions", "endpoint", "up", "down",
                    "fused_resample", "in_features", "out_features")


class UnknownSourceWarning(UserWarning):
    """The file embeds a network source that is not one of :data:`KNOWN_SOURCES`."""


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


_MAX_DEPTH = 64   # EDM networks nest about 6 modules deep


def module_tensors(record, prefix: str = "", _seen: set | None = None) -> dict[str, TensorRef]:
    """The state-dict entries (parameters and persistent buffers) of a recorded module tree.
    The file decides the tree's shape: a tree deeper than 64 modules, one holding a module
    twice (or itself) or a group that is not a dict of named entries is refused by name."""
    seen = set() if _seen is None else _seen
    if not isinstance(record, (PersistentRecord, ObjectRecord)) or not isinstance(record.state, dict):
        raise ConversionError(f"{prefix or 'the network'} is a {type(record).__name__}, not a module")
    if id(record) in seen or prefix.count(".") > _MAX_DEPTH:
        raise ConversionError(f"{prefix or 'the network'}: the module tree repeats a module or nests more than "
                              f"{_MAX_DEPTH} levels deep")
    seen.add(id(record))
    state = record.state
    skip = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, TensorRef] = {}
    for group in ("_parameters", "_buffers", "_modules"):
        entries = state.get(group) or {}
        if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
            raise ConversionError(f"{prefix}{group} is a {type(entries).__name__}, not a dict of named entries")
        for name, value in entries.items():
            if value is None or (group == "_buffers" and isinstance(skip, (set, frozenset)) and name in skip):
                continue
            if group == "_modules":
                out.update(module_tensors(value, f"{prefix}{name}.", seen))
            elif not isinstance(value, TensorRef):
                raise ConversionError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            else:
                out[prefix + name] = value
    return out


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(f"preconditioner argument {name}={value!r} is not an integer")
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
    """``(network, precond, source)`` from a recorded EDM preconditioner: the network keywords
    (JSON-friendly; ``model_type`` unless DhariwalUNet), the preconditioner's ``config()``
    keywords (``class_name`` unless EDMPrecond) and facts about the source (``use_fp16``, the
    recorded keywords, dropped ones, the SHA-256 of the embedded source)."""
    if not isinstance(ema, PersistentRecord):
        raise ConversionError(f"the 'ema' entry is a {type(ema).__name__}, not an EDM network")
    cls_name = ema.class_name
    if cls_name not in _EDM_PRECONDS:
        raise ConversionError(f"the network is an EDM {cls_name}; relaydiff converts the preconditioners "
                              f"{', '.join(_EDM_PRECONDS)}")
    own, default_model = _EDM_PRECONDS[cls_name]
    order = (*_COMMON_ARGS, *own, "model_type")
    args, kwargs = ema.init_args or (), ema.init_kwargs
    if kwargs is None or not isinstance(kwargs, dict):
        raise ConversionError(f"the {cls_name} was saved without its constructor arguments (_init_kwargs)")
    if len(args) > len(order):
        raise ConversionError(f"{cls_name} has {len(args)} positional arguments (at most {len(order)})")
    kw = dict(zip(order, args))
    twice = sorted(set(kw) & set(kwargs))
    if twice:
        raise ConversionError(f"{cls_name} arguments given twice: {twice}")
    kw.update(kwargs)
    recorded = _json_value(kw)

    model_type = kw.pop("model_type", default_model)
    if model_type not in NETWORKS:
        raise ConversionError(f"the network's model_type is {model_type!r}; relaydiff implements "
                              f"{', '.join(NETWORKS)}")
    for name in ("img_resolution", "img_channels"):
        if name not in kw:
            raise ConversionError(f"the {cls_name} arguments lack {name!r}")
    resolution = _int("img_resolution", kw.pop("img_resolution"))
    channels = _int("img_channels", kw.pop("img_channels"))
    label_dim = _int("label_dim", kw.pop("label_dim", 0))
    use_fp16 = bool(kw.pop("use_fp16", False))
    precond = {} if cls_name == "EDMPrecond" else dict(class_name=cls_name)
    for name, default in own.items():
        value = kw.pop(name, default)
        precond[name] = _int(name, value) if name == "M" else float(value)
    dropped = {k: _json_value(kw.pop(k)) for k in _IGNORED_KWARGS if k in kw}

    net_cls = NETWORKS[model_type]
    params = inspect.signature(net_cls).parameters
    fixed = {"img_resolution", "in_channels", "out_channels", "label_dim"}   # set from the preconditioner's own
    unknown = sorted(set(kw) - (set(params) - fixed))
    if unknown:
        raise ConversionError(f"{model_type} keyword(s) relaydiff does not implement: {unknown}")
    # relaydiff's network defaults are EDM's; written out so the file describes itself
    network = {} if model_type == "DhariwalUNet" else dict(model_type=model_type)
    network.update((k, p.default) for k, p in params.items() if p.default is not inspect.Parameter.empty)
    # iDDPM's network also predicts the variance: twice the image channels
    out_channels = channels * (2 if cls_name == "iDDPMPrecond" else 1)
    network.update(img_resolution=resolution, in_channels=channels, out_channels=out_channels, label_dim=label_dim,
                   **kw)
    network = {k: _json_value(v) for k, v in network.items()}
    sha = hashlib.sha256(ema.module_src.encode()).hexdigest()
    source = dict(class_name=cls_name, use_fp16=use_fp16, init_kwargs=recorded, dropped_kwargs=dropped,
                  module_src_sha256=sha, known_source=KNOWN_SOURCES.get(sha))
    return network, precond, source


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_architecture(record, module: torch.nn.Module, prefix: str = "") -> None:
    """Compare a recorded module tree with relaydiff's ``module``: the class at every path and
    the :data:`_ARCH_ATTRIBUTES` both carry. Raises :class:`ConversionError` naming the first
    difference."""
    where = prefix.rstrip(".") or "the network"
    if isinstance(record, PersistentRecord) and record.class_name != type(module).__name__:
        raise ConversionError(f"{where} is an EDM {record.class_name} where relaydiff builds a {type(module).__name__}")
    state = getattr(record, "state", None) if isinstance(record, (PersistentRecord, ObjectRecord)) else None
    state = state if isinstance(state, dict) else {}
    for name in _ARCH_ATTRIBUTES:
        if name in state and hasattr(module, name) and not _same(state[name], getattr(module, name)):
            raise ConversionError(
                f"{where}.{name} is {state[name]!r} in the file but {getattr(module, name)!r} in the network its "
                "arguments describe: the embedded source changes an architecture constant relaydiff relies on")
    children = dict(module.named_children())
    for name, child in (state.get("_modules") or {}).items():
        if child is not None and name in children:
            check_architecture(child, children[name], f"{prefix}{name}.")


def _check_buffer(name: str, value: torch.Tensor, ours: torch.Tensor) -> None:
    """Buffers that the constructor arguments fix must hold what they give: resampling filters
    exactly, iDDPM's level table ``u`` to float32 round-off (the file's own values are kept).
    Other buffers (NCSN++'s random Fourier frequencies) are weights like any other."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "resample_filter" and not torch.equal(value, ours):
        raise ConversionError(f"buffer {name} differs from the resampling filter the network's arguments give "
                              "(the source uses another filter)")
    if leaf == "u" and not torch.allclose(value, ours, rtol=1e-5, atol=0.0):
        raise ConversionError(f"buffer {name} (iDDPM's noise levels) differs from the table its C_1, C_2, M give")


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


def _resolve_stage(loss, stage: str | None, relay,
                   precond_class: str = "EDMPrecond") -> tuple[str, RelayConfig | None]:
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
    # EDM's losses train stage-1 models, and RDM relay stages are EDMPrecond networks: an EDM
    # VP/VE/iDDPM network (the baselines, whose loss may be missing) is a stage 1
    if stage == "base" or (stage is None and loss_name != "BlurLoss"
                           and (loss_name in _BASE_LOSSES or precond_class != "EDMPrecond")):
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
                    progress: bool = False) -> tuple[Precond, dict[str, Any]]:
    """Read an EDM ``.pkl`` or RDM ``.pt`` (its ``ema`` network) into the relaydiff
    preconditioner of the same name (eval mode, CPU, float32) and the metadata of a converted file.

    ``stage``: ``"base"`` / ``"relay"``; ``relay``: a :class:`RelayConfig` or one of
    :data:`RELAY_PRESETS` (implies ``stage="relay"``). Both are inferred from an EDM pickle's
    ``loss_fn`` (``EDMLoss``: base; RDM ``BlurLoss``: relay with its settings); an RDM ``.pt``
    carries no loss, so one of them is required there.

    Raises :class:`~relaydiff.models.safe_pickle.ForbiddenGlobal` for a file that names code
    outside the allow-list, :class:`ConversionError` for a network relaydiff cannot rebuild
    (by name: unsupported class or keyword, missing/unexpected/mis-shaped tensors, a recorded
    architecture constant that differs from relaydiff's). Warns (:class:`UnknownSourceWarning`,
    also in ``meta["source"]["warnings"]``) when the embedded network source is not one of
    :data:`KNOWN_SOURCES`."""
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
        stage, relay_cfg = _resolve_stage(loss, stage, relay, source["class_name"])

        found = module_tensors(ema)
        # names and shapes first, on the meta device: a small file declaring a huge network
        # is refused before anything is allocated
        _check_names(found, declared_model(network, precond, len(found), src).state_dict())
        model = build_model(network, precond)
        check_architecture(ema, model)
        targets = model.state_dict()   # the model's own parameters and buffers (shared storage)
        buffers = {name for name, _ in model.named_buffers()}
        for name, ref in tqdm(found.items(), desc="tensors", unit="tensor", disable=not progress, leave=False):
            if not ref.dtype.is_floating_point:
                raise ConversionError(f"{name} is {ref.dtype} (expected {targets[name].dtype})")
            value = ref.load().to(targets[name].dtype)
            if name in buffers:
                _check_buffer(name, value, targets[name])
            with torch.no_grad():
                targets[name].copy_(value)

    source.update(file=src.name, format=kind, sha256=_sha256(src),
                  nimg=nimg if isinstance(nimg, int) and not isinstance(nimg, bool) else None)
    meta = dict(stage=stage, network=network, precond=precond,
                relay=relay_cfg.to_dict() if relay_cfg is not None else None,
                step=0, kimg=source["nimg"] / 1000 if source["nimg"] is not None else 0.0,
                resolution=network["img_resolution"], label_dim=network["label_dim"], source=source)
    if source["known_source"] is None:
        message = (f"{src.name}: its embedded network source (sha256 {source['module_src_sha256']}) is not one "
                   "of the known released sources; converted from its recorded arguments and tensors, which cannot "
                   "show every change a modified source makes")
        source["warnings"] = [message]
        warnings.warn(message, UnknownSourceWarning, stacklevel=2)
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
                    relay: RelayConfig | str | None = None) -> tuple[Precond, dict[str, Any]]:
    """A denoiser from a converted ``.safetensors`` file (or any file or run directory
    :func:`~relaydiff.models.load_model` reads: its EMA weights), or straight from an EDM
    ``.pkl`` / RDM ``.pt`` converted in memory (``stage``/``relay`` as in :func:`convert_release`).
    Returns ``(denoiser in eval mode on device, meta)``."""
    path = pathlib.Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return load_model(path, which="ema", device=device)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    model, meta = convert_release(path, stage=stage, relay=relay)
    return model.to(device), meta
