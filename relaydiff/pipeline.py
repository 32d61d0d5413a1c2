"""Generation end to end (SPEC 6-7): a stage-1 model samples low-resolution images, a relay
model continues the diffusion at ``patch_size`` times the resolution from them.

``RelayPipeline(stage1, stage2, config)`` holds the two denoisers; ``stage1`` may itself be a
pipeline, which makes a cascade (64 -> 256 -> 1024 is
``RelayPipeline(RelayPipeline(base, relay256, cfg256), relay1024, cfg1024)``), or ``None``
for a pipeline that only super-resolves. Seeds are split deterministically per batch,
stage and step, so ``(seed, n, batch_size)`` fixes every image; with per-image seeds
(``seeds=[...]``, EDM's convention) image ``i`` depends on ``seeds[i]`` alone.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from relaydiff.config import NoiseConfig, RelayConfig
from relaydiff.ops._validate import check_image, check_seed

from .sampling import cfg, edm_grid, get_preset, nearest_upsample, relay_init, sample_edm, sample_relay
from .sampling.presets import SamplerPreset
from .sampling.seeds import authors_class_labels, check_seeds, derive_seed, seeded, split_seed

# derive_seed paths: one independent noise source per use
_LATENT, _BASE, _INIT, _RELAY, _INNER, _LABELS = range(1, 7)


class PipelineError(ValueError):
    """Stages that do not fit together, or a checkpoint of the wrong stage."""


def load_stage(path, stage: str, which: str = "ema", device="cpu"):
    """Load a trainer checkpoint (run directory, checkpoint file or converted release) with
    ``relaydiff.models.load_model`` and check that it is a ``stage`` ("base" or "relay")
    model. Returns ``(model in eval mode, metadata)``."""
    from relaydiff.models import load_model  # the models package imports this one's siblings

    model, meta = load_model(path, which=which, device=device)
    got = meta.get("stage")
    if got != stage:
        want = "stage-1 (base)" if stage == "base" else "relay (stage-2)"
        raise PipelineError(f"{path} is a {got!r}-stage checkpoint, not a {want} one")
    return model.eval(), meta


def _attr(module, name: str, meta: dict | None, meta_key: str | None = None):
    value = getattr(module, name, None)
    if value is None and meta is not None:
        value = meta.get(meta_key or name, (meta.get("network") or {}).get(name))
    return value


def _check_chain(low_res: int, patch_size: int, high_res: int) -> None:
    if low_res * patch_size != high_res:
        raise PipelineError(f"stage 1 makes {low_res}px images and the relay stage (patch size {patch_size}) "
                            f"expects {high_res // patch_size}px inputs for {high_res}px outputs")


def _device_of(module) -> torch.device:
    params = getattr(module, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


class RelayPipeline:
    """A stage-1 sampler followed by a relay stage.

    Args:
        stage1: the base denoiser (e.g. ``EDMPrecond``), another ``RelayPipeline`` whose
            outputs this relay stage continues, or ``None`` (``super_resolve`` only).
        stage2: the relay denoiser, trained with ``config``.
        config: the relay stage's :class:`~relaydiff.RelayConfig` (blur, noise, schedule).
        sampler: a preset name of ``relaydiff.sampling.PRESETS`` or a ``SamplerPreset``.
        low_shape: ``(C, h, w)`` of stage 1's images; default from ``stage1.img_channels``
            and ``stage1.img_resolution`` (the ``EDMPrecond`` attributes).
        label_dim: number of classes (0: unconditional); default the stages' ``label_dim``.
        base_noise: the :class:`~relaydiff.NoiseConfig` stage 1 was trained with (white or
            block noise, paper App. C.2): it draws stage 1's initial latent and churn noise.
            ``None``: white. Only for a pipeline whose ``stage1`` is a denoiser.
        consistency: keep the low-resolution input's patch means exactly (see
            :class:`PatchMeanConsistency`): every relay prediction has its ``p x p`` patch means
            replaced by the input's pixels, so the output box-downsamples to the input.

    The relay grid never starts above the relay stage's trained top (``config.sigma_max``):
    levels above it are dropped with a one-line notice (:meth:`relay_sigmas`).

    ``last_nfe`` holds the denoiser calls per batch of the latest call, per stage.
    """

    def __init__(self, stage1, stage2, config: RelayConfig, *, sampler: str | SamplerPreset = "default",
                 low_shape: tuple[int, int, int] | None = None, label_dim: int | None = None,
                 consistency: bool = False, base_noise: NoiseConfig | None = None):
        if not isinstance(config, RelayConfig):
            raise TypeError(f"config must be a RelayConfig; got {type(config).__name__}")
        if stage2 is None:
            raise PipelineError("stage2 (the relay denoiser) is required")
        if base_noise is not None and (stage1 is None or isinstance(stage1, RelayPipeline)):
            raise PipelineError("base_noise belongs to the pipeline whose stage1 is the stage-1 denoiser "
                                "(the innermost of a cascade)")
        self.base_noise = NoiseConfig.of(base_noise, "base_noise")
        if not isinstance(consistency, bool):
            raise TypeError(f"consistency must be a bool; got {type(consistency).__name__}")
        self.stage1, self.stage2, self.config = stage1, stage2, config
        self.consistency = consistency
        self._warned_top = False
        self.preset = get_preset(sampler)
        if low_shape is None:
            if isinstance(stage1, RelayPipeline):
                low_shape = stage1.out_shape
            elif stage1 is not None:
                c, r = getattr(stage1, "img_channels", None), getattr(stage1, "img_resolution", None)
                if c is None or r is None:
                    raise PipelineError("stage1 has no img_channels/img_resolution attributes; "
                                        "pass low_shape=(C, h, w)")
                low_shape = (int(c), int(r), int(r))
        self.low_shape = None if low_shape is None else tuple(int(v) for v in low_shape)
        hi = getattr(stage2, "img_resolution", None)
        if self.low_shape is not None and hi is not None:
            _check_chain(self.low_shape[1], config.patch_size, int(hi))
        if label_dim is None:
            dims = [int(getattr(m, "label_dim", 0) or 0) for m in (stage1, stage2)
                    if m is not None and not isinstance(m, RelayPipeline)]
            if isinstance(stage1, RelayPipeline):
                dims.append(stage1.label_dim)
            label_dim = max(dims)
        self.label_dim = int(label_dim)
        self.last_nfe: dict[str, int] = {}

    # -- construction from the trainer's checkpoints
    @classmethod
    def from_checkpoints(cls, stage1_path, stage2_path, *more_relay_paths, which: str = "ema",
                         device="cpu", sampler: str | SamplerPreset = "default",
                         consistency: bool = False) -> "RelayPipeline":
        """Load a base checkpoint (or ``None``: super-resolution only) and one or more relay
        checkpoints, chained in order, with ``relaydiff.models.load_model`` (docs/CONTRACTS.md).
        ``which`` picks the EMA (default) or raw weights; ``consistency`` as in the
        constructor, for every relay stage. The base checkpoint's noise (metadata
        ``block_noise``; absent in older checkpoints: white) becomes ``base_noise``. Raises
        :class:`PipelineError` for a checkpoint of the wrong stage or resolutions that do not chain."""
        prev, low_shape, label_dim, base_noise = None, None, 0, None
        if stage1_path is not None:
            prev, meta = load_stage(stage1_path, "base", which, device)
            res = int(_attr(prev, "img_resolution", meta, "resolution"))
            low_shape = (int(_attr(prev, "img_channels", meta) or 3), res, res)
            label_dim = int(meta.get("label_dim") or 0)
            if meta.get("block_noise"):
                base_noise = NoiseConfig.from_dict(meta["block_noise"])
        for path in (stage2_path, *more_relay_paths):
            model, meta = load_stage(path, "relay", which, device)
            if not meta.get("relay"):
                raise PipelineError(f"{path}: relay checkpoint without a RelayConfig in its metadata")
            config = RelayConfig.from_dict(meta["relay"])
            p, res = config.patch_size, int(_attr(model, "img_resolution", meta, "resolution"))
            if low_shape is None:
                if res % p:
                    raise PipelineError(f"{path}: resolution {res} is not a multiple of the patch size {p}")
                low_shape = (int(_attr(model, "img_channels", meta) or 3), res // p, res // p)
            _check_chain(low_shape[1], p, res)
            label_dim = max(label_dim, int(meta.get("label_dim") or 0))
            prev = cls(prev, model, config, sampler=sampler, low_shape=low_shape, label_dim=label_dim,
                       consistency=consistency, base_noise=None if isinstance(prev, cls) else base_noise)
            low_shape = prev.out_shape
        return prev

    # -- shapes and devices
    @property
    def out_shape(self) -> tuple[int, int, int] | None:
        if self.low_shape is None:
            return None
        c, h, w = self.low_shape
        return (c, h * self.config.patch_size, w * self.config.patch_size)

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """``(C, h, w)`` of the images the lowest relay stage of the cascade starts from."""
        return self.stage1.input_shape if isinstance(self.stage1, RelayPipeline) else self.low_shape

    @property
    def device(self) -> torch.device:
        return _device_of(self.stage2)

    def base(self):
        """The stage-1 denoiser at the bottom of the cascade (``None`` if there is none)."""
        return self.stage1.base() if isinstance(self.stage1, RelayPipeline) else self.stage1

    # -- labels
    def _labels(self, n: int, class_labels, seed: int) -> torch.Tensor | None:
        """``[n, label_dim]`` one-hot floats from indices, one-hot rows or (``None``) random
        classes drawn from ``seed``; ``None`` for unconditional models."""
        return self._onehot(self._label_rows(n, class_labels, seed))

    def _label_rows(self, n: int, class_labels, seed) -> torch.Tensor | None:
        """The checked labels in compact form, on the CPU: ``[n]`` class indices or ``[n,
        label_dim]`` rows (a million images' indices take 8 MB, their one-hot rows 4 GB)."""
        if self.label_dim == 0:
            if class_labels is not None:
                raise ValueError("class_labels given, but the models are unconditional (label_dim 0)")
            return None
        if class_labels is None and isinstance(seed, tuple) and self.preset.labels == "seed-mod":
            class_labels = authors_class_labels(seed, self.label_dim)   # the authors' scripts: seed % label_dim
        elif class_labels is None and isinstance(seed, tuple):   # per-image seeds: a class per seed
            class_labels = torch.cat([torch.randint(self.label_dim, (1,), generator=torch.Generator()
                                                    .manual_seed(s)) for s in split_seed(seed, _LABELS)])
        elif class_labels is None:
            g = torch.Generator().manual_seed(derive_seed(seed, _LABELS))
            class_labels = torch.randint(self.label_dim, (n,), generator=g)
        labels = torch.as_tensor(class_labels).cpu()
        if labels.dim() == 1 and not labels.is_floating_point():
            if labels.numel() != n or bool(((labels < 0) | (labels >= self.label_dim)).any()):
                shown = labels.tolist() if labels.numel() <= 32 else f"{labels.numel()} indices"
                raise ValueError(f"class_labels must be {n} class indices in [0, {self.label_dim}); got {shown}")
            return labels.long()
        if labels.shape != (n, self.label_dim):
            raise ValueError(f"class_labels must be [n] indices or [n, {self.label_dim}] one-hot rows "
                             f"with n = {n}; got shape {tuple(labels.shape)}")
        return labels

    def _onehot(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Compact labels (:meth:`_label_rows`) -> one-hot float32 rows on this pipeline's device."""
        if rows is None:
            return None
        if rows.dim() == 1:
            rows = torch.nn.functional.one_hot(rows, self.label_dim)
        return rows.to(device=self.device, dtype=torch.float32)

    @staticmethod
    def _for(module, labels):
        return labels if int(getattr(module, "label_dim", 0) or 0) > 0 else None

    # -- the stages
    def _preset(self, steps) -> SamplerPreset:
        if steps is None:
            return self.preset
        if isinstance(steps, int):
            return self.preset.with_steps(steps, steps)
        s1, rl = steps
        return self.preset.with_steps(s1, rl)

    def _sample_base(self, n: int, labels, seed: int, steps, disable) -> torch.Tensor:
        st = self._preset(steps).stage1
        # the grid within the levels stage 1 supports (a VP, VE or iDDPM model's sigma_min and
        # sigma_max attributes), as EDM's generate.py clamps it; sample_edm rounds it with the
        # model's round_sigma as EDM does (iDDPM: its discrete levels; the identity for the others),
        # and the latent starts at the rounded top level
        lo = max(st.sigma_min, float(getattr(self.stage1, "sigma_min", 0.0) or 0.0))
        hi = min(st.sigma_max, float(getattr(self.stage1, "sigma_max", math.inf) or math.inf))
        sigmas = dataclasses.replace(st, sigma_min=lo, sigma_max=hi).sigmas(self.device)
        latent = torch.empty((n, *self.low_shape), device=self.device)
        top = float(edm_grid(self.stage1, sigmas)[0])
        latent = seeded(self.base_noise.draw, split_seed(seed, _LATENT), latent) * top
        x, self.last_nfe["stage1"] = sample_edm(
            cfg(self.stage1, st.cfg), latent, sigmas, class_labels=self._for(self.stage1, labels),
            noise=self.base_noise, seed=split_seed(seed, _BASE), disable=disable, return_nfe=True,
            **st.sampler_kwargs())
        return x

    def relay_sigmas(self, steps=None) -> torch.Tensor:
        """The relay grid this pipeline runs: the preset's, without the levels above the relay
        stage's trained top ``config.sigma_max`` (a denoiser is undefined above the levels it
        was trained on). Dropping levels prints a one-line notice once per pipeline; a grid
        with no level left raises :class:`PipelineError`."""
        rs = self._preset(steps).relay
        top = self.config.sigma_max
        sigmas = rs.sigmas(self.device, trained_max=top)
        above = int((sigmas > top * (1 + 1e-9)).sum())
        if above:
            if above >= sigmas.numel() - 1:
                raise PipelineError(f"the relay sampler's grid (lowest level {float(sigmas[-2]):.4g}) lies above "
                                    f"the relay stage's trained top sigma {top:.4g} (truncation "
                                    f"{self.config.truncation}); use a grid starting at the trained top "
                                    "(RelaySampling(sigma_max=None))")
            if not self._warned_top:
                self._warned_top = True
                print(f"relaydiff: the relay stage was trained up to sigma {top:.4g} (truncation "
                      f"{self.config.truncation}); the sampler's grid starts at {float(sigmas[0]):.4g}, so it "
                      f"starts at {float(sigmas[above]):.4g} instead ({above} levels dropped; a grid from the "
                      "trained top: the 'short' preset or RelaySampling(sigma_max=None))", file=sys.stderr)
            sigmas = sigmas[above:]
        return sigmas

    def _relay(self, low: torch.Tensor, labels, seed: int, steps, disable) -> torch.Tensor:
        rs = self._preset(steps).relay
        sigmas = self.relay_sigmas(steps)
        x = relay_init(low, float(sigmas[0]), self.config, seed=split_seed(seed, _INIT))
        denoiser = cfg(self.stage2, rs.cfg)
        if self.consistency:
            denoiser = PatchMeanConsistency(denoiser, low, self.config.patch_size)
        x, self.last_nfe["relay"] = sample_relay(
            denoiser, x, sigmas, self.config, class_labels=self._for(self.stage2, labels),
            seed=split_seed(seed, _RELAY), disable=disable, return_nfe=True, **rs.sampler_kwargs())
        return x

    def _generate(self, n: int, labels, seed: int, steps, disable) -> list[torch.Tensor]:
        """``[stage-1 images, relay outputs of every stage up to this one]`` for one batch."""
        if isinstance(self.stage1, RelayPipeline):
            levels = self.stage1._generate(n, labels, split_seed(seed, _INNER), steps, disable)
        else:
            levels = [self._sample_base(n, labels, seed, steps, disable)]
        levels.append(self._relay(levels[-1], labels, seed, steps, disable))
        return levels

    def _upscale(self, low: torch.Tensor, labels, seed: int, steps, disable) -> torch.Tensor:
        if isinstance(self.stage1, RelayPipeline):
            low = self.stage1._upscale(low, labels, split_seed(seed, _INNER), steps, disable)
        return self._relay(low, labels, seed, steps, disable)

    # -- public API
    def sample(self, n: int | None = None, class_labels=None, *, steps: int | tuple[int, int] | None = None,
               seed: int | None = None, seeds=None, batch_size: int = 16, return_low: bool = False,
               disable: bool | None = None):
        """Generate ``n`` images ``[n, C, H, W]`` in [-1, 1] at this pipeline's output resolution.

        ``class_labels``: ``[n]`` class indices or ``[n, label_dim]`` one-hot rows for a
        class-conditional model (``None``: random classes from ``seed``, or with per-image
        ``seeds`` and a preset of ``labels="seed-mod"``, the ``authors-*`` presets, class
        ``seeds[i] % label_dim`` as the authors' scripts). ``steps``: the grid
        size of both stages, or ``(stage1, relay)``; the relay grid is counted before
        truncation (the preset's ``sigma_cut`` drops its top). ``seed``: ``None`` draws one
        from torch's global generator; batch ``k`` uses seeds derived from ``(seed, k *
        batch_size)``, its images share each noise draw (one op call per draw: the fastest).
        ``seeds``: instead, one seed per image (``n`` may then be omitted): image ``i``, its
        noise and its random class, depend on ``seeds[i]`` alone, whatever ``batch_size`` and
        the other seeds (EDM's convention: one image of a grid can be regenerated alone; each
        noise op runs once per image). ``return_low``: also return the images this relay stage
        started from (``[n, C, H/p, W/p]``, in [-1, 1]).
        """
        highs, lows = [], []
        for _, high, low in self.iter_sample(n, class_labels, steps=steps, seed=seed, seeds=seeds,
                                             batch_size=batch_size, disable=disable):
            highs.append(high)
            lows.append(low)
        high = torch.cat(highs)
        return (high, torch.cat(lows)) if return_low else high

    def iter_sample(self, n: int | None = None, class_labels=None, *, steps: int | tuple[int, int] | None = None,
                    seed: int | None = None, seeds=None, batch_size: int = 16, start: int = 0,
                    disable: bool | None = None):
        """:meth:`sample` one batch at a time: yields ``(j, high, low)``, the images ``j ..
        j + len(high) - 1`` and the images their relay stage started from, as each batch
        finishes, so that a caller can write them out without holding every image (``relaydiff
        sample --n 1000000`` does). ``start``: the first image to make, a multiple of
        ``batch_size``; the images are exactly those ``sample`` returns from index ``start`` on
        (so a run stopped after some batches resumes bit-identically). ``seed`` must then be
        given (``None`` would draw a new one)."""
        if self.base() is None:
            raise PipelineError("this pipeline has no stage-1 model; use super_resolve")
        if start and seed is None and seeds is None:
            raise ValueError("start > 0 needs the seed of the run it continues; got seed=None")
        n, seed = _seeding(n, seed, seeds)
        batch_size = _positive(batch_size, "batch_size")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= n or start % batch_size:
            raise ValueError(f"start must be a multiple of batch_size ({batch_size}) in [0, {n}]; got {start!r}")
        rows = self._label_rows(n, class_labels, seed)
        for j in tqdm(range(start, n, batch_size), disable=disable, desc="batches", unit="batch",
                      initial=start // batch_size, total=-(-n // batch_size)):
            b = min(batch_size, n - j)
            levels = self._generate(b, None if rows is None else self._onehot(rows[j:j + b]),
                                    seed[j:j + b] if isinstance(seed, tuple) else derive_seed(seed, j),
                                    steps, disable)
            yield j, levels[-1].clamp(-1, 1), levels[-2].clamp(-1, 1)

    def super_resolve(self, images_low: torch.Tensor, class_labels=None, *,
                      steps: int | tuple[int, int] | None = None, seed: int | None = None, seeds=None,
                      batch_size: int = 16, disable: bool | None = None) -> torch.Tensor:
        """Continue the relay diffusion from given images (paper App. C.3: the relay stage
        also repairs artifacts in its input, since it does not condition on it).

        ``images_low`` ``[B, C, h, w]`` in [-1, 1], of any size the relay network accepts
        (the size it was trained for, ``low_shape``, works best). In a cascade every relay
        stage runs in turn. Returns ``[B, C, h*P, w*P]`` in [-1, 1]
        with ``P`` the product of the stages' patch sizes. ``steps`` (an int) is the relay
        grid size before truncation. ``seeds``: one seed per input image, as in :meth:`sample`.
        """
        check_image(images_low, "images_low")
        if self.input_shape is not None and images_low.shape[1] != self.input_shape[0]:
            raise ValueError(f"images_low must have {self.input_shape[0]} channels; "
                             f"got shape {tuple(images_low.shape)}")
        batch_size = _positive(batch_size, "batch_size")
        n = images_low.shape[0]
        n, seed = _seeding(n, seed, seeds, allow_empty=True)
        labels = self._labels(n, class_labels, seed) if n else None
        steps = None if steps is None else (None, steps) if isinstance(steps, int) else steps
        outs = []
        for j in tqdm(range(0, n, batch_size), disable=disable, desc="batches", unit="batch"):
            low = images_low[j:j + batch_size].to(device=self.device, dtype=torch.float32)
            outs.append(self._upscale(low, None if labels is None else labels[j:j + low.shape[0]],
                                      seed[j:j + batch_size] if isinstance(seed, tuple) else derive_seed(seed, j),
                                      steps, disable).clamp(-1, 1))
        if not outs:
            p = self._total_scale()
            return images_low.new_empty((0, images_low.shape[1], images_low.shape[2] * p,
                                         images_low.shape[3] * p))
        return torch.cat(outs)

    def _total_scale(self) -> int:
        inner = self.stage1._total_scale() if isinstance(self.stage1, RelayPipeline) else 1
        return inner * self.config.patch_size

    def __repr__(self) -> str:
        return (f"RelayPipeline(low_shape={self.low_shape}, out_shape={self.out_shape}, "
                f"label_dim={self.label_dim}, config={self.config}, preset={self.preset})")


class PatchMeanConsistency:
    """A relay denoiser whose predictions keep the low-resolution input's patch means.

    The relay blur never changes a patch's DC coefficient (``a(0, 0) = 1``, SPEC 2), and the
    input ``low`` is the box-downsample of the image being restored, so the true ``x0`` has
    exactly ``nearest_upsample(low)`` as its patch means. Each prediction ``D`` is projected
    onto that set: ``D - up(pool(D)) + up(low)`` (the orthogonal projection: only the DC
    coefficients change). The sampler returns the last prediction, so the output's box
    downsample is ``low`` (up to clamping to [-1, 1] and rounding).
    """

    def __init__(self, denoiser, low: torch.Tensor, patch_size: int):
        self.denoiser, self.patch_size = denoiser, int(patch_size)
        self.means = nearest_upsample(low, self.patch_size)

    def __call__(self, x, sigma, class_labels=None):
        d = self.denoiser(x, sigma, class_labels)
        p = self.patch_size
        return d - nearest_upsample(F.avg_pool2d(d, p), p) + self.means.to(d.dtype)


def _seeding(n, seed, seeds, allow_empty: bool = False) -> tuple[int, int | tuple[int, ...]]:
    """``(n, seed)`` of ``sample``/``super_resolve``: the checked batch seed, or with ``seeds`` the
    tuple of per-image seeds (then ``n`` is their number)."""
    if seeds is None:
        return (n if allow_empty else _positive(n, "n")), check_seed(seed)
    if seed is not None:
        raise ValueError("pass seed (one seed for all batches) or seeds (one per image), not both")
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    if not isinstance(seeds, (list, tuple, range)) or not (seeds or allow_empty):
        raise ValueError(f"seeds must be a non-empty sequence of integers (one per image); got {seeds!r}")
    if n is not None and n != len(seeds):
        raise ValueError(f"seeds must hold one seed per image: {n} images, {len(seeds)} seeds")
    return len(seeds), check_seeds(list(seeds), len(seeds))


def _positive(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer; got {v!r}")
    return v
