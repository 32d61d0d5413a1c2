"""``TrainConfig``: everything one training run needs (docs/CONTRACTS.md, "Training entry point").

Options left at ``None`` take the preset's value (``relaydiff.models.PRESETS``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from relaydiff.config import NoiseConfig, RelayConfig
from relaydiff.models.presets import Preset, get_preset, min_resolution_divisor

STAGES = ("base", "relay")


class ConfigError(ValueError):
    """A training option or the data is unusable; raised before anything is written."""

AMP_CHOICES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class TrainConfig:
    stage: str = "base"                     # "base" (stage 1, plain EDM) or "relay" (stage 2)
    data: str = ""                          # folder (recursive) or zip of PNG/JPEG images
    out: str = ""                           # run directory (checkpoints/, samples/, log.jsonl)
    preset: str = "tiny"                    # model + hyper-parameter preset (relaydiff.models.PRESETS)
    resolution: int | None = None           # training resolution; relay: the high resolution
    crop: int | None = None                 # train on random crop x crop windows of the resolution-size
                                            # images (None: the preset's, else whole images)
    batch: int | None = None                # images per optimizer step, all processes together
    accum: int = 1                          # gradient-accumulation rounds per optimizer step
    steps: int | None = None                # optimizer steps in total (or give kimg)
    kimg: float | None = None               # thousands of training images in total (or give steps)
    lr: float | None = None                 # Adam learning rate
    warmup_kimg: float | None = None        # linear learning-rate warm-up, thousands of images
    ema_halflife_kimg: float | None = None  # EMA half-life, thousands of images
    ema_rampup: float | None = 0.05         # half-life <= ema_rampup * images seen (EDM); None: off
    grad_clip: float | None = None          # clip the global gradient norm to this (None: off)
    dropout: float | None = None            # U-Net dropout
    label_dropout: float | None = None      # class-label dropout for classifier-free guidance
    labels: bool | None = None              # class labels from top-level sub-folders (None: auto)
    xflip: bool = True                      # random horizontal flips
    augment: float | None = None            # geometric augmentation probability (0: off; None: preset's)
    amp: str | None = None                  # None/"float32", "bfloat16" or "float16" (loss scaling)
    compile: bool = False                   # torch.compile the model
    grad_checkpointing: bool = False        # recompute U-Net block activations in the backward pass
    minutes: float | None = None            # wall-clock budget: checkpoint and return when spent
    seed: int = 0                           # seeds weights, data order, noise
    device: str | None = None               # "cpu", "cuda", "cuda:1"; None: CUDA when available
    resume: bool = False                    # continue from OUT/checkpoints/latest
    quiet: bool = False                     # no progress bar
    relay: RelayConfig | None = None        # relay stage settings (None: the preset's or defaults)
    block_noise: float = 0.0                # base stage: alpha of mixed block noise (paper App. C.2; 0: white)
    block_noise_size: int = 4               # base stage: its block size s, in [1, 16]
    workers: int | None = None              # DataLoader workers (None: 0 for cached data, else 4)
    cache: bool | None = None               # keep decoded images in memory (None: when <= 256 MiB)
    log_every: int = 50                     # steps between log.jsonl lines
    checkpoint_every: int = 1000            # steps between checkpoints (one is always written at the end)
    checkpoint_minutes: float | None = None # also a checkpoint whenever this much wall clock passed since one
    sample_every: int = 1000                # steps between sample grids (0: only at the end, -1: never)
    sample_count: int = 16                  # images per sample grid
    keep: int = 3                           # checkpoints kept (0: all)

    def preset_info(self) -> Preset:
        return get_preset(self.preset)

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` that has a preset value filled in; raises ``ValueError``
        naming the first bad option (a ``ConfigError``)."""
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}; got {self.stage!r}")
        try:
            p = self.preset_info()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if p.stage is not None and p.stage != self.stage:
            raise ConfigError(f"preset {self.preset!r} is a {p.stage}-stage preset; got stage {self.stage!r}")
        if not self.data:
            raise ConfigError("data: give a folder or zip of images")
        if not self.out:
            raise ConfigError("out: give a run directory")
        c = dataclasses.replace(self)
        if c.stage == "relay":
            c.relay = c.relay or p.relay or RelayConfig()
            if not isinstance(c.relay, RelayConfig):
                raise ConfigError(f"relay must be a RelayConfig; got {type(c.relay).__name__}")
        else:
            c.relay = None
        if c.resolution is None:
            c.resolution = p.resolution * (c.relay.patch_size if p.stage is None and c.relay else 1)
        if c.crop is None and p.crop is not None and p.crop < c.resolution:
            c.crop = p.crop
        for name in ("batch", "lr", "warmup_kimg", "ema_halflife_kimg", "label_dropout", "augment"):
            if getattr(c, name) is None:
                setattr(c, name, getattr(p, name))
        if c.dropout is None:
            c.dropout = p.network.get("dropout", 0.0)
        if c.amp == "float32":
            c.amp = None
        c._validate()
        return c

    def _validate(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer; got {v!r}")

        def non_negative(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number >= 0; got {v!r}")

        for name in ("resolution", "batch", "accum", "log_every", "checkpoint_every", "sample_count"):
            positive_int(name)
        div = min_resolution_divisor(self.preset)
        if self.resolution % div:
            raise ConfigError(f"resolution {self.resolution} must be a multiple of {div} for preset {self.preset!r}")
        if self.crop is not None:
            positive_int("crop")
            if self.crop > self.resolution or self.crop % div:
                raise ConfigError(f"crop {self.crop} must be at most the resolution {self.resolution} and a "
                                  f"multiple of {div} for preset {self.preset!r}")
            if self.relay is not None and self.crop % self.relay.patch_size:
                raise ConfigError(f"crop {self.crop} must be a multiple of the relay patch size "
                                  f"{self.relay.patch_size}")
        if self.relay is not None:
            p = self.relay.patch_size
            if self.resolution % p:
                raise ConfigError(f"resolution {self.resolution} must be a multiple of the relay patch size {p}")
            if self.relay.block_size > self.resolution:
                raise ConfigError(f"relay block_size {self.relay.block_size} exceeds the resolution {self.resolution}")
        self._validate_block_noise()
        if self.steps is None and self.kimg is None and self.minutes is None:
            raise ConfigError("give steps, kimg or minutes (how long to train)")
        if self.steps is not None and self.kimg is not None:
            raise ConfigError("give steps or kimg, not both")
        if self.steps is not None:
            positive_int("steps")
        if self.checkpoint_minutes is not None and (
                isinstance(self.checkpoint_minutes, bool) or not isinstance(self.checkpoint_minutes, (int, float))
                or not (math.isfinite(self.checkpoint_minutes) and self.checkpoint_minutes > 0)):
            raise ConfigError(f"checkpoint_minutes must be a positive number of minutes; got {self.checkpoint_minutes!r}")
        for name in ("kimg", "minutes", "grad_clip", "ema_rampup"):
            non_negative(name, allow_none=True)
        for name in ("lr", "warmup_kimg", "ema_halflife_kimg", "dropout", "label_dropout"):
            non_negative(name)
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive; got {self.lr!r}")
        non_negative("augment")
        if self.augment > 1:
            raise ConfigError(f"augment must be a probability in [0, 1]; got {self.augment!r}")
        if not self.dropout < 1 or not self.label_dropout < 1:
            raise ConfigError(f"dropout and label_dropout must be < 1; got {self.dropout!r}, {self.label_dropout!r}")
        if self.amp not in (None,) + AMP_CHOICES:
            raise ConfigError(f"amp must be one of {AMP_CHOICES} or None; got {self.amp!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ConfigError(f"workers must be an integer >= 0; got {self.workers!r}")
        if not isinstance(self.sample_every, int) or self.sample_every < -1:
            raise ConfigError(f"sample_every must be an integer >= -1; got {self.sample_every!r}")
        if not isinstance(self.keep, int) or self.keep < 0:
            raise ConfigError(f"keep must be an integer >= 0; got {self.keep!r}")

    def _validate_block_noise(self) -> None:
        a, s = self.block_noise, self.block_noise_size
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (a >= 0 and math.isfinite(a)):
            raise ConfigError(f"block_noise must be a finite number >= 0; got {a!r}")
        if a > 0 and self.stage != "base":
            raise ConfigError("block_noise applies to the base stage only; the relay stage's block noise is "
                              "its RelayConfig's alpha and block_size (--alpha, --block-size)")
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 16:
            raise ConfigError(f"block_noise_size must be an integer in [1, 16]; got {s!r}")
        size = self.crop or self.resolution   # the noise is drawn on the (cropped) training images
        if a > 0 and s > size:
            raise ConfigError(f"block_noise_size {s} exceeds the training image size {size}")

    def base_noise(self) -> NoiseConfig | None:
        """The stage-1 noise of a base run (``EDMLoss``/``sample_edm``'s ``noise``); None for
        the relay stage, whose noise is ``relay``'s."""
        if self.stage != "base":
            return None
        return NoiseConfig(alpha=float(self.block_noise), block_size=self.block_noise_size)

    def total_steps(self, batch: int) -> int | None:
        if self.steps is not None:
            return self.steps
        if self.kimg is not None:
            return max(1, math.ceil(self.kimg * 1000 / batch))
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["relay"] = self.relay.to_dict() if self.relay is not None else None
        return d
