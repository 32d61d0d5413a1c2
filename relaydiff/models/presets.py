"""Named model + training presets.

The published ones follow the RDM paper's Table 4 (SPEC 8-9); the small ones train on a CPU.
A preset fixes the U-Net's architecture; the resolution, the number of classes and the
image channels come from the data (``network_kwargs``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from relaydiff.config import RelayConfig

from .precond import PRECONDITIONERS, Precond
from .songunet import SongUNet
from .unet import DhariwalUNet

# the networks a weight file may name (metadata "network": {"model_type": ..., **keywords})
NETWORKS = {"DhariwalUNet": DhariwalUNet, "SongUNet": SongUNet}


@dataclasses.dataclass(frozen=True)
class Preset:
    description: str
    stage: str | None          # "base" | "relay" for the published presets, None: either
    resolution: int            # default training resolution (px); for stage None the base stage's
                               # (a relay stage then trains at resolution * patch_size)
    network: dict[str, Any]    # DhariwalUNet keywords except img_resolution, channels, label_dim
    lr: float                  # Adam learning rate
    batch: int                 # images per optimizer step (all processes together)
    ema_halflife_kimg: float   # EMA half-life in thousands of images
    warmup_kimg: float         # linear learning-rate warm-up in thousands of images
    label_dropout: float       # class-label dropout for classifier-free guidance
    label_dim: int = 0         # classes of the published dataset (0: unconditional)
    relay: RelayConfig | None = None   # published relay settings (None: RelayConfig() defaults)
    augment: float = 0.0       # geometric augmentation probability (paper Table 4)
    crop: int | None = None    # train on random crops of this size (None: whole images)


_ADM64 = dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8))
_ADM256 = dict(model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_blocks=2, attn_resolutions=(32, 16, 8))

PRESETS: dict[str, Preset] = {
    "imagenet64-base": Preset(
        "ImageNet 64x64 stage 1, class-conditional ADM (~296M parameters)", "base", 64,
        dict(_ADM64, dropout=0.10), lr=1e-4, batch=4096, ema_halflife_kimg=50000, warmup_kimg=10000,
        label_dropout=0.1, label_dim=1000),
    "imagenet256-relay": Preset(
        "ImageNet 64->256 relay stage, class-conditional ADM (~553M parameters)", "relay", 256,
        dict(_ADM256, dropout=0.10), lr=1e-4, batch=4096, ema_halflife_kimg=50000, warmup_kimg=10000,
        label_dropout=0.1, label_dim=1000, relay=RelayConfig.imagenet256()),
    "celebahq64-base": Preset(
        "CelebA-HQ 64x64 stage 1, unconditional ADM (~295M parameters)", "base", 64,
        dict(_ADM64, dropout=0.15), lr=1e-4, batch=1024, ema_halflife_kimg=500, warmup_kimg=10000,
        label_dropout=0.0, augment=0.2),
    "celebahq256-relay": Preset(
        "CelebA-HQ 64->256 relay stage, unconditional ADM (~553M parameters)", "relay", 256,
        dict(_ADM256, dropout=0.20), lr=1e-4, batch=1024, ema_halflife_kimg=500, warmup_kimg=10000,
        label_dropout=0.0, relay=RelayConfig.celebahq256(), augment=0.2),
    "small": Preset(
        "CPU demo model (~7.7M parameters): 16x16 base or 16->64 relay in tens of minutes", None, 16,
        dict(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16, 8), dropout=0.0),
        lr=5e-4, batch=32, ema_halflife_kimg=10, warmup_kimg=2, label_dropout=0.1),
    "tiny": Preset(
        "test/smoke model (<1M parameters): 16x16 base or 16->64 relay at several steps/s on 2 cores",
        None, 16,
        dict(model_channels=32, channel_mult=(1, 1, 2), channel_mult_emb=2, num_blocks=1, attn_resolutions=(),
             dropout=0.0),
        lr=2e-3, batch=4, ema_halflife_kimg=1, warmup_kimg=0.1, label_dropout=0.1),
    # What a relay stage can learn in minutes on a CPU (docs/demo.md has the measurements): the
    # tiny network on 32 px crops of the 64 px images (it is convolutional: sampling runs at
    # 64 px), batch 16, and the relay schedule truncated at 0.15 (sigma <= 0.087), so the stage
    # continues from a lightly noised low-resolution image instead of re-inferring it from
    # sigma 0.9. Sample it with the "short" sampler preset.
    "tiny-relay": Preset(
        "short-run relay stage 16->64 (<1M parameters): tiny network on 32 px crops, truncation 0.15",
        "relay", 64,
        dict(model_channels=32, channel_mult=(1, 1, 2), channel_mult_emb=2, num_blocks=1, attn_resolutions=(),
             dropout=0.0),
        lr=2e-3, batch=16, ema_halflife_kimg=1, warmup_kimg=0.1, label_dropout=0.1,
        relay=RelayConfig(truncation=0.15), crop=32),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def min_resolution_divisor(name: str) -> int:
    """The U-Net halves the resolution ``len(channel_mult) - 1`` times: resolutions must be
    multiples of this."""
    return 1 << (len(get_preset(name).network["channel_mult"]) - 1)


def network_kwargs(name: str, resolution: int | None = None, label_dim: int | None = None,
                   channels: int = 3, **overrides) -> dict[str, Any]:
    """Full :class:`DhariwalUNet` keywords of preset ``name`` (JSON-friendly: lists, not tuples)."""
    p = get_preset(name)
    kw = dict(img_resolution=int(resolution or p.resolution), in_channels=channels, out_channels=channels,
              label_dim=int(p.label_dim if label_dim is None else label_dim), **p.network)
    kw.update(overrides)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}


def _network(network: dict[str, Any]):
    """``(class, keywords)`` of a metadata ``"network"`` dict; ``model_type`` defaults to DhariwalUNet."""
    kw = dict(network)
    name = kw.pop("model_type", "DhariwalUNet")
    try:
        return NETWORKS[name], kw
    except KeyError:
        raise ValueError(f"unknown model_type {name!r}; relaydiff implements {', '.join(NETWORKS)}") from None


def build_model(network: dict[str, Any], precond: dict[str, Any] | None = None) -> Precond:
    """``EDMPrecond(DhariwalUNet(**network), **precond)``: the inverse of the checkpoint metadata.
    ``network["model_type"]`` (default ``"DhariwalUNet"``) and ``precond["class_name"]`` (default
    ``"EDMPrecond"``) pick another network (:data:`NETWORKS`) or preconditioner
    (:data:`~relaydiff.models.precond.PRECONDITIONERS`)."""
    cls, kw = _network(network)
    pre = dict(precond or {})
    name = pre.pop("class_name", "EDMPrecond")
    if name not in PRECONDITIONERS:
        raise ValueError(f"unknown preconditioner {name!r}; relaydiff implements {', '.join(PRECONDITIONERS)}")
    return PRECONDITIONERS[name](cls(**kw), **pre)


def count_parameters(network: dict[str, Any]) -> int:
    """Parameters of the network of a metadata ``"network"`` dict, built on the meta device (no memory, ~ms)."""
    import torch
    cls, kw = _network(network)
    with torch.device("meta"):
        net = cls(**kw)
    return sum(math.prod(p.shape) for p in net.parameters())
