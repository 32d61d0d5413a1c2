"""``relaydiff study``: the paper's central claims at toy scale (docs/study.md).

Arms (:data:`ARMS`), each trained with the same budget (``minutes`` of wall clock or ``kimg``
thousand images per arm), the same network (the ``tiny`` preset's U-Net, 0.83M parameters),
the same data and evaluated the same way:

* cascade arms (``relay``, ``relay-white``, ``relay-short``, ``cogview3``) and ``cdm``: a 16 px
  stage 1 (``BASE_SHARE`` of the budget) and a 16 -> 64 second stage (the rest). Stage 1 is
  trained once per seed and shared, so these arms differ only in their second stage and are
  scored on the same stage-1 samples (a paired comparison);
* ``scratch`` / ``scratch-block``: one 64 px EDM model, the whole budget.

Per (arm, seed): generation (64 px samples vs the held-out 64 px images: SWD, FID and KID with
``inception``), super-resolution of the held-out images' 4x box-downsamples for the arms with
a second stage (PSNR/SSIM/consistency/hf_psd/SWD, :func:`relaydiff.demo.superres_scores`),
denoiser calls per image at 64 px and 16 px, and sampling seconds per image. The 64 px stage
of every arm also saves ``CURVE_POINTS`` snapshots over its budget; each is scored on the first
``N_CURVE`` held-out images (gen SWD, and SR PSNR where there is a second stage): the metric vs
training time curves. Results go to ``OUT/study.json`` after every (arm, seed), so a rerun
with the same settings skips what is done.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import pathlib
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from relaydiff.config import NoiseConfig, RelayConfig
from relaydiff.demo import BASE_SHARE, LOW, PATCH, TILE, build_data, load_heldout, superres_scores
from relaydiff.images import from_uint8, load_image, list_images, to_uint8

VERSION = 3                  # 2: metric-vs-training-time curves; 3: KID, exact small-set FID, SR SWD over
                             # every neighbourhood (relaydiff.demo.superres_scores)
PRESET = "tiny"              # the network of every arm (tiny-relay has the same network)
BATCH = 16                   # images per optimizer step, every stage of every arm
CROP = 32                    # second stages (relay, cdm) train on 32 px crops of the 64 px images
N_HELDOUT = 32               # held-out images (= generated samples per arm and seed: SWD needs equal N)
SAMPLE_BATCH = 16
SMOKE = dict(steps=2, batch=4, n_heldout=4, n_crops=4, max_tiles=16, stage1_steps=3, relay_steps=8, scratch_steps=3)
EDM_STEPS = 32               # EDM grid of stage 1, scratch and cdm (63 denoiser calls)
CURVE_POINTS = 3             # snapshots of each arm's 64 px stage: at 1/3, 2/3 and all of its budget
N_CURVE = 16                 # held-out images (and samples) scoring each snapshot


class StudyError(ValueError):
    """A setting or the output folder does not allow the study; raised before training."""


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    kind: str                            # "cascade" | "scratch" | "cdm"
    description: str
    relay: RelayConfig | None = None     # cascade arms: the relay stage's config
    relay_preset: str = PRESET           # cascade arms: the training preset of the relay stage
    sampler: str = "default"             # cascade arms: relaydiff.sampling.PRESETS
    block_noise: float = 0.0             # scratch arms: alpha of the base-stage block noise


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("relay", "cascade", "relay 16->64, paper defaults (alpha 0.15, T 0.93, DCT blur); Sec. 3, Tables 1-3",
        RelayConfig()),
    Arm("relay-white", "cascade", "relay with white noise (alpha 0); paper Fig. 4 ablation",
        RelayConfig(alpha=0.0)),
    Arm("relay-short", "cascade", "relay, the demo's short-run recipe (tiny-relay: T 0.15, 'short' sampler)",
        RelayConfig(truncation=0.15), relay_preset="tiny-relay", sampler="short"),
    Arm("cogview3", "cascade", "CogView3's linear-blur relay (blur='linear', SPEC 2b)",
        RelayConfig(blur="linear")),
    Arm("scratch", "scratch", "from-scratch 64 px EDM model, white noise"),
    Arm("scratch-block", "scratch", "from-scratch 64 px EDM model, block noise alpha 0.15, s 4; App. C.2 Fig. 6",
        block_noise=0.15),
    Arm("cdm", "cdm", "conventional cascade (CDM / ADM-U): EDM from pure noise, upsampled low-res concatenated"),
)}


@dataclasses.dataclass
class StudyConfig:
    out: str = "study_out"
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0, 1, 2)
    minutes: float | None = None         # wall clock per arm (cascades: split BASE_SHARE / rest)
    kimg: float | None = None            # or thousands of training images per arm (same split)
    smoke: bool = False                  # tiny data, SMOKE["steps"] optimizer steps per stage (CI)
    data: str | None = None              # training images (folder or zip); None: the demo's
    heldout: str | None = None           # folder of 64 px held-out images (required with data)
    n_heldout: int | None = None         # demo data only (default N_HELDOUT; smoke SMOKE)
    inception: str | None = None         # Inception weights: adds FID and KID
    device: str | None = None
    quiet: bool = False

    def validate(self) -> None:
        if not self.arms or any(a not in ARMS for a in self.arms) or len(set(self.arms)) != len(self.arms):
            raise StudyError(f"arms must be distinct names from {', '.join(ARMS)}; got {list(self.arms)}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise StudyError(f"seeds must be distinct integers >= 0; got {list(self.seeds)}")
        budgets = [b for b in (self.minutes, self.kimg) if b is not None]
        if not self.smoke and len(budgets) != 1:
            raise StudyError("give one budget: minutes (wall clock per arm) or kimg (thousands of images per arm)")
        for name in ("minutes", "kimg"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not (math.isfinite(v) and v > 0)):
                raise StudyError(f"{name} must be a positive number; got {v!r}")
        if (self.data is None) != (self.heldout is None):
            raise StudyError("data and heldout go together: a training set and its held-out 64 px images")
        if self.data is not None and self.n_heldout is not None:
            raise StudyError("n_heldout applies to the demo's data only; with data, heldout holds the images")
        if self.n_heldout is not None and (isinstance(self.n_heldout, bool) or not isinstance(self.n_heldout, int)
                                           or not 2 <= self.n_heldout <= 512):
            raise StudyError(f"n_heldout must be an integer in [2, 512]; got {self.n_heldout!r}")

    def settings(self) -> dict:
        """What an (arm, seed) result depends on: a rerun into the same ``out`` must match."""
        return {"version": VERSION, "minutes": self.minutes, "kimg": self.kimg, "smoke": self.smoke,
                "data": None if self.data is None else str(pathlib.Path(self.data).resolve()),
                "heldout": None if self.heldout is None else str(pathlib.Path(self.heldout).resolve()),
                "n_heldout": self.n_heldout, "inception": self.inception, "preset": PRESET,
                "batch": SMOKE["batch"] if self.smoke else BATCH, "crop": CROP, "base_share": BASE_SHARE}


# ------------------------------------------------------------------------------ budgets

def _budget(cfg: StudyConfig, share: float) -> dict:
    """TrainConfig budget keywords for a stage that gets ``share`` of an arm's budget."""
    if cfg.smoke:
        return dict(steps=SMOKE["steps"], minutes=None, kimg=None)
    if cfg.minutes is not None:
        return dict(steps=None, kimg=None, minutes=cfg.minutes * share)
    return dict(steps=None, minutes=None, kimg=cfg.kimg * share)


def _snapshots(cfg: StudyConfig, share: float) -> dict:
    """Checkpoint keywords that snapshot a stage ``CURVE_POINTS`` times over its budget."""
    b = _budget(cfg, share)
    if b["minutes"] is not None:
        return dict(checkpoint_every=10 ** 9, checkpoint_minutes=b["minutes"] / CURVE_POINTS, keep=0)
    batch = SMOKE["batch"] if cfg.smoke else BATCH
    total = b["steps"] if b["steps"] is not None else math.ceil(b["kimg"] * 1000 / batch)
    return dict(checkpoint_every=max(1, math.ceil(total / CURVE_POINTS)), keep=0)


def stage_config(arm: str, stage: str, cfg: StudyConfig, data: str, run_dir, seed: int):
    """The :class:`~relaydiff.training.TrainConfig` of ``arm``'s ``stage`` (``"base"``: the shared
    16 px stage 1 of the cascade arms and cdm, or the 64 px scratch model; ``"relay"``)."""
    from relaydiff.training import TrainConfig
    a = ARMS[arm]
    batch = SMOKE["batch"] if cfg.smoke else BATCH
    common = dict(data=data, out=str(run_dir), batch=batch, labels=False, cache=True, workers=0, seed=seed,
                  device=cfg.device, quiet=cfg.quiet, log_every=1 if cfg.smoke else 25, sample_every=-1)
    if stage == "base" and a.kind == "scratch":
        return TrainConfig(stage="base", preset=PRESET, resolution=TILE, block_noise=a.block_noise,
                           block_noise_size=4, **_budget(cfg, 1.0), **_snapshots(cfg, 1.0), **common)
    if stage == "base":
        return TrainConfig(stage="base", preset=PRESET, resolution=LOW, **_budget(cfg, BASE_SHARE),
                           checkpoint_every=10 ** 9, keep=1, **common)
    if a.kind != "cascade":
        raise ValueError(f"arm {arm!r} has no relay stage")
    return TrainConfig(stage="relay", preset=a.relay_preset, resolution=TILE, crop=CROP, relay=a.relay,
                       **_budget(cfg, 1.0 - BASE_SHARE), **_snapshots(cfg, 1.0 - BASE_SHARE), **common)


def _last_log(run_dir: pathlib.Path) -> dict:
    return json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])


def _train(tc) -> dict:
    from relaydiff.training import train
    run = pathlib.Path(tc.out)
    if run.exists():     # an unfinished run of an interrupted study: start it again
        shutil.rmtree(run)
    t = time.monotonic()
    train(tc)
    last = _last_log(run)
    return {"run": str(run), "steps": int(last["step"]), "kimg": float(last["kimg"]),
            "train_s": float(last["seconds"]), "wall_s": time.monotonic() - t}


# ----------------------------------------------------------------------------- cdm model

def build_cdm(resolution: int = TILE, preset: str = PRESET):
    """The cdm arm's denoiser: ``EDMPrecond(LowResConcat(DhariwalUNet(6 -> 3 channels)))``,
    called as ``D(x, sigma, None, low=low)``."""
    from relaydiff.models import EDMPrecond, build_model, network_kwargs
    from relaydiff.models.conditioned import LowResConcat
    inner = build_model(network_kwargs(preset, resolution, label_dim=0, in_channels=6)).model
    return EDMPrecond(LowResConcat(inner))


def train_cdm(cfg: StudyConfig, data: str, run_dir: pathlib.Path, seed: int) -> tuple[dict, torch.nn.Module]:
    """Train the cdm arm's second stage with :class:`~relaydiff.diffusion.LowResEDMLoss`: the
    ``tiny`` preset's Adam learning rate, warm-up and EMA, ``CROP`` px crops on the patch grid,
    the second stage's budget. A compact loop (no checkpoints or resume within the run; the
    EMA weights are saved to ``run_dir/ema.pt``, and snapshots of them every 1/``CURVE_POINTS``
    of the budget to ``run_dir/snapshots/step-N.pt``). Returns ``(record, EMA denoiser)``."""
    from relaydiff.data import ImageDataset, InfiniteSampler, uint8_to_float
    from relaydiff.diffusion import LowResEDMLoss
    from relaydiff.models import get_preset
    from relaydiff.training.loop import _update_ema, random_crop
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    p = get_preset(PRESET)
    b = _budget(cfg, 1.0 - BASE_SHARE)
    batch = SMOKE["batch"] if cfg.smoke else BATCH
    total = b["steps"] if b["steps"] is not None else (math.ceil(b["kimg"] * 1000 / batch) if b["kimg"] else None)
    snap = _snapshots(cfg, 1.0 - BASE_SHARE)
    (run_dir / "snapshots").mkdir()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = ImageDataset(data, TILE, xflip=True, labels=False, cache=True)
    torch.manual_seed(seed)
    model = build_cdm().to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=p.lr, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = LowResEDMLoss(PATCH)
    torch.manual_seed(seed * 1000003 + 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=InfiniteSampler(len(dataset), seed=seed),
                                         generator=torch.Generator().manual_seed(seed))
    batches = iter(loader)
    step, nimg, start = 0, 0, time.monotonic()
    t_snap = start
    log = open(run_dir / "log.jsonl", "w")
    bar = tqdm(total=total, unit="step", disable=cfg.quiet, desc="cdm")
    while True:
        images = uint8_to_float(next(batches)[0].to(device))
        images = random_crop(images, CROP, PATCH)
        for group in opt.param_groups:
            group["lr"] = p.lr * min(nimg / (p.warmup_kimg * 1000), 1.0) if p.warmup_kimg > 0 else p.lr
        loss = loss_fn(model, images)
        opt.zero_grad(set_to_none=True)
        (loss.sum() / batch).backward()
        opt.step()
        step, nimg = step + 1, nimg + batch
        _update_ema(ema, model, 0.5 ** (batch / max(min(p.ema_halflife_kimg * 1000, nimg * 0.05), 1e-8)))
        bar.update(1)
        seconds = time.monotonic() - start
        stop = (total is not None and step >= total) or (b["minutes"] is not None and seconds >= b["minutes"] * 60)
        if step % (1 if cfg.smoke else 25) == 0 or stop:
            log.write(json.dumps({"step": step, "kimg": nimg / 1000, "loss": float(loss.detach().mean()),
                                  "seconds": seconds}) + "\n")
        if stop:
            break
        if ("checkpoint_minutes" in snap and time.monotonic() - t_snap >= snap["checkpoint_minutes"] * 60) or \
                ("checkpoint_minutes" not in snap and step % snap["checkpoint_every"] == 0):
            torch.save(ema.state_dict(), run_dir / "snapshots" / f"step-{step:07d}.pt")
            t_snap = time.monotonic()
    bar.close()
    log.close()
    torch.save(ema.state_dict(), run_dir / "ema.pt")
    return {"run": str(run_dir), "steps": step, "kimg": nimg / 1000, "train_s": seconds,
            "wall_s": time.monotonic() - start}, ema


# ---------------------------------------------------------------------------- sampling

def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def sample_edm_batches(denoiser, n: int, resolution: int, steps: int, seed: int, noise: NoiseConfig | None = None,
                       low: torch.Tensor | None = None, device=None) -> tuple[torch.Tensor, int]:
    """``n`` EDM samples ``[n, 3, R, R]`` in [-1, 1] from ``sigma_max`` (the ``default`` preset's
    stage-1 settings with ``steps`` levels), optionally conditioned on ``low`` ``[n, 3, h, w]``
    (the cdm arm); returns ``(images, denoiser calls per image)``."""
    from relaydiff.sampling import get_preset, sample_edm
    from relaydiff.sampling.seeds import derive_seed
    st = dataclasses.replace(get_preset("default").stage1, steps=steps)
    noise = NoiseConfig.of(noise)
    sigmas = st.sigmas(device)
    outs, nfe = [], 0
    for j in range(0, n, SAMPLE_BATCH):
        b = min(SAMPLE_BATCH, n - j)
        latent = noise.draw(torch.empty(b, 3, resolution, resolution, device=device), derive_seed(seed, 2 * j))
        den = denoiser
        if low is not None:
            cond = low[j:j + b].to(device)
            den = lambda x, s, c=None, _cond=cond: denoiser(x, s, c, low=_cond)  # noqa: E731
        x, nfe = sample_edm(den, latent * float(sigmas[0]), sigmas, noise=noise, seed=derive_seed(seed, 2 * j + 1),
                            disable=True, return_nfe=True, **st.sampler_kwargs())
        outs.append(x.clamp(-1, 1).cpu())
    return torch.cat(outs), nfe


def _final(a: Arm, run: str, device):
    """The trained 64 px stage of an arm: ``(model, meta)`` (cascade) or the EMA denoiser."""
    from relaydiff.models import load_model
    from relaydiff.pipeline import load_stage
    if a.kind == "cascade":
        return load_stage(run, "relay", device=device)
    if a.kind == "cdm":
        return _load_snapshot(a, pathlib.Path(run) / "ema.pt", device)
    return load_model(run, device=device)[0].eval()


def _load_snapshot(a: Arm, path: pathlib.Path, device):
    """One snapshot of an arm's 64 px stage, loaded as :func:`_final` loads the end of it."""
    if a.kind == "cdm":
        model = build_cdm()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.to(device).eval().requires_grad_(False)
    return _final(a, str(path), device)


def _snapshot_list(a: Arm, run: str) -> list[tuple[int, float, pathlib.Path]]:
    """``(step, training seconds, file)`` of the snapshots before the end of a 64 px stage; the
    seconds are interpolated in the run's log (steps vs seconds, from (0, 0))."""
    run = pathlib.Path(run)
    files = sorted((run / "snapshots").glob("step-*.pt") if a.kind == "cdm" else
                   (run / "checkpoints").glob("step-*.safetensors"))
    rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]
    steps = [0] + [r["step"] for r in rows]
    seconds = [0.0] + [r["seconds"] for r in rows]
    out = []
    for f in files:
        step = int(f.name.split("-")[1].split(".")[0])
        if step < steps[-1]:
            out.append((step, float(np.interp(step, steps, seconds)), f))
    return out


def _outputs(a: Arm, loaded, cfg: StudyConfig, seed: int, device, n: int, low_gen, low_truth):
    """An arm's 64 px stage at work: ``(gen, sr, nfe64, gen seconds)``: ``n`` generated images
    (from ``low_gen``, the stage-1 samples, for cascades and cdm) and the super-resolution of
    ``low_truth`` (``None`` without it or for scratch arms). The first images of a call with a
    smaller ``n`` are the same draws as a larger call's."""
    from relaydiff.pipeline import RelayPipeline
    from relaydiff.sampling import get_preset
    steps = SMOKE["scratch_steps"] if cfg.smoke else EDM_STEPS
    sr = None
    if a.kind == "cascade":
        model, meta = loaded
        preset = get_preset(a.sampler)
        if cfg.smoke:
            preset = preset.with_steps(None, SMOKE["relay_steps"] if a.sampler == "default" else None)
        pipe = RelayPipeline(None, model, RelayConfig.from_dict(meta["relay"]), sampler=preset, consistency=True)
        gen, t = _timed(lambda: pipe.super_resolve(low_gen[:n].to(device), seed=seed, disable=True).cpu(), device)
        nfe = pipe.last_nfe["relay"]
        if low_truth is not None:
            sr = pipe.super_resolve(low_truth[:n].to(device), seed=seed + 1, disable=True).cpu()
    elif a.kind == "cdm":
        (gen, nfe), t = _timed(lambda: sample_edm_batches(loaded, n, TILE, steps, seed, low=low_gen[:n],
                                                          device=device), device)
        if low_truth is not None:
            sr, _ = sample_edm_batches(loaded, n, TILE, steps, seed + 1, low=low_truth[:n], device=device)
    else:
        noise = NoiseConfig(alpha=a.block_noise, block_size=4)
        (gen, nfe), t = _timed(lambda: sample_edm_batches(loaded, n, TILE, steps, seed, noise=noise,
                                                          device=device), device)
    return gen, sr, nfe, t


def _curve_scores(gen, sr, truth) -> dict:
    """One point of the metric vs training time curves: gen SWD, and SR PSNR / SSIM."""
    from relaydiff.metrics import swd
    out = {"gen_swd": swd(gen, truth)["swd_mean"]}
    if sr is not None:
        s = superres_scores({"x": sr}, truth)["x"]
        out.update(sr_psnr=float(s["psnr"].mean()), sr_ssim=float(s["ssim"].mean()))
    return out


# ------------------------------------------------------------------------------ scoring

def _t_abs_cdf(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with integer ``df`` and ``t >= 0``: the finite sums of
    Abramowitz & Stegun 26.7.3-4 in ``theta = atan(t / sqrt(df))`` (positive terms, no
    cancellation)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:                  # sin(theta) (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2.0 * theta / math.pi
    term = total = 1.0               # (2/pi)(theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3)))
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with integer ``df >= 1`` degrees of freedom, without
    scipy: closed forms for ``df`` 1 and 2, otherwise Newton's method on :func:`_t_abs_cdf`
    from the normal quantile (a lower bound for ``q > 1/2``; the CDF is concave there, so the
    iterates rise monotonically to the root). Agrees with ``scipy.stats.t.ppf`` to ~1e-13."""
    if isinstance(df, bool) or not isinstance(df, (int, np.integer)) or df < 1:
        raise ValueError(f"df must be an integer >= 1; got {df!r}")
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1); got {q!r}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    if q == 0.5:
        return 0.0
    if df == 1:
        return math.tan(math.pi * (q - 0.5))
    if df == 2:
        return (2.0 * q - 1.0) / math.sqrt(2.0 * q * (1.0 - q))
    from statistics import NormalDist
    df = int(df)
    target = 2.0 * q - 1.0           # P(|T| < t)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = NormalDist().inv_cdf(q)
    for _ in range(100):
        pdf = math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))
        step = (target - _t_abs_cdf(t, df)) / (2.0 * pdf)
        t += step
        if abs(step) <= 1e-15 * t:
            break
    return t


def t_interval(values: list[float]) -> dict:
    """Mean and the half-width of the 95% t interval (``None`` for one value)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "half": None, "n": int(v.size)}
    half = float(t_quantile(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return {"mean": mean, "half": half, "n": int(v.size)}


METRICS = [   # (key, column title, lower is better)
    ("gen_swd", "gen SWD", True), ("gen_fid", "gen FID", True), ("gen_kid", "gen KID", True),
    ("sr_psnr", "SR PSNR dB", False), ("sr_ssim", "SR SSIM", False), ("sr_consistency", "SR consist. dB", False),
    ("sr_hf_psd", "SR hf", True), ("sr_swd", "SR SWD", True),
    ("nfe_64", "NFE 64px", True), ("nfe_16", "NFE 16px", True), ("s_per_image", "s/img", True),
    ("train_steps", "steps (64px stage)", False), ("train_s", "train s", False),
]


def _fid(ref, gen) -> float:
    """FID of two :class:`~relaydiff.metrics.FeatureStats` (their ``pool`` features ``[N, D]``).
    With fewer images than feature dimensions (the study's case: 32 images, 2048-d features)
    the covariances are singular and ``tr sqrt(S1 S2)`` is computed exactly as the nuclear norm
    ``||A B^T||_* / sqrt((N1 - 1)(N2 - 1))`` of the centred features ``A``, ``B``: milliseconds,
    where :func:`~relaydiff.metrics.frechet_distance` takes 2048 x 2048 matrix square roots
    (~30 s on 2 CPU cores) and adds ``1e-6 I`` to the covariances when their product is too
    singular. Otherwise :func:`~relaydiff.metrics.frechet_distance` of the Gaussian statistics."""
    from relaydiff.metrics import frechet_distance
    x, y = np.asarray(ref.pool, np.float64), np.asarray(gen.pool, np.float64)
    if max(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
    a, b = x - x.mean(0), y - y.mean(0)
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / math.sqrt((len(x) - 1) * (len(y) - 1))
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (a * a).sum() / (len(x) - 1) + (b * b).sum() / (len(y) - 1) - 2.0 * tr_sqrt)


def _score(gen, sr, truth, extractor=None, ref=None, device=None) -> dict:
    """The final scores of an (arm, seed); FID and KID with ``extractor`` (``ref``: the
    held-out images' :func:`~relaydiff.metrics.compute_stats` through it, computed when None)."""
    from relaydiff.metrics import swd
    out = {"gen_swd": swd(gen, truth)["swd_mean"]}
    if extractor is not None:
        from relaydiff.metrics import compute_stats, kid
        if ref is None:
            ref = compute_stats(truth, extractor, device=device, progress=False)
        g = compute_stats(gen, extractor, device=device, progress=False)
        out["gen_fid"] = _fid(ref, g)
        out["gen_kid"] = kid(ref.pool, g.pool)
    if sr is not None:
        s = superres_scores({"x": sr}, truth)["x"]
        out.update(sr_psnr=float(s["psnr"].mean()), sr_ssim=float(s["ssim"].mean()),
                   sr_consistency=float(s["consistency"].mean()), sr_hf_psd=s["hf_psd"], sr_swd=s["swd"])
    return out


def summarize(results: dict, arms, seeds) -> dict:
    """``{arm: {metric: t_interval over seeds}}`` of the recorded (arm, seed) results."""
    summary = {}
    for arm in arms:
        rows = [results[arm][str(s)] for s in seeds if str(s) in results.get(arm, {})]
        if rows:
            summary[arm] = {k: t_interval([r[k] for r in rows]) for k, _, _ in METRICS if all(k in r for r in rows)}
    return summary


def curve_summary(results: dict, arms, seeds) -> dict:
    """``{arm: [point]}``, the metric vs training time curves over seeds: point ``i`` holds the
    mean training seconds of the ``i``-th snapshot and each metric's :func:`t_interval` (only
    where every seed has as many snapshots)."""
    curves = {}
    for arm in arms:
        runs = [results[arm][str(s)]["curve"] for s in seeds
                if "curve" in results.get(arm, {}).get(str(s), {})]
        if not runs:
            continue
        length = min(len(c) for c in runs)
        points = []
        for i in range(length):
            pts = [c[i] for c in runs]
            point = {"seconds": float(np.mean([p["seconds"] for p in pts])), "n": len(pts)}
            for key in ("gen_swd", "sr_psnr", "sr_ssim"):
                if all(key in p for p in pts):
                    point[key] = t_interval([p[key] for p in pts])
            points.append(point)
        curves[arm] = points
    return curves


PAIRED = ("gen_swd", "gen_fid", "gen_kid", "sr_psnr", "sr_ssim", "sr_hf_psd", "sr_swd")


def paired_differences(results: dict, arms, seeds, reference: str) -> dict:
    """``{arm: {metric: t_interval of (arm - reference) over the seeds both have}}``. Arms of
    one seed share its stage 1, its held-out images and its sampling seeds, so the per-seed
    difference removes what the seed does to both: a paired comparison, tighter than
    comparing the two arms' own intervals."""
    out = {}
    ref = results.get(reference, {})
    for arm in arms:
        if arm == reference:
            continue
        common = [str(s) for s in seeds if str(s) in ref and str(s) in results.get(arm, {})]
        cells = {}
        for key in PAIRED:
            if common and all(key in ref[s] and key in results[arm][s] for s in common):
                cells[key] = t_interval([results[arm][s][key] - ref[s][key] for s in common])
        if cells:
            out[arm] = cells
    return out


def paired_table(paired: dict, reference: str) -> str:
    """Markdown: each arm minus ``reference``, per seed then mean ± 95% t half-width; a
    difference whose interval excludes 0 is marked ``*``."""
    keys = [k for k, _, _ in METRICS if k in PAIRED and any(k in c for c in paired.values())]
    titles = {k: t for k, t, _ in METRICS}
    lines = [f"Paired differences, arm minus `{reference}` (same seed: same stage 1, held-out images and "
             f"sampling seeds); `*`: the 95% interval excludes 0.", "",
             "| arm | seeds | " + " | ".join(f"Δ {titles[k]}" for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for arm, cells in paired.items():
        n = max(v["n"] for v in cells.values())
        row = []
        for k in keys:
            v = cells.get(k)
            text = _fmt(v, k) if v is not None else "n/a"
            if v is not None and v["half"] is not None and abs(v["mean"]) > v["half"]:
                text += " *"
            row.append(text)
        lines.append(f"| {arm} | {n} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: dict | None, key: str) -> str:
    if v is None:
        return "n/a"
    digits = 0 if key in ("nfe_64", "nfe_16", "train_steps", "train_s") else 4 if key == "gen_kid" else \
        3 if key in ("sr_ssim", "sr_hf_psd", "s_per_image") else 2
    text = f"{v['mean']:.{digits}f}"
    return text if v["half"] is None else f"{text} ± {v['half']:.{digits}f}"


def markdown_table(summary: dict, baselines: dict | None = None) -> str:
    """Arms x metrics, ``mean ± half-width of the 95% t interval`` over seeds."""
    keys = [(k, title) for k, title, _ in METRICS if any(k in s for s in summary.values())]
    lines = ["| arm | seeds | " + " | ".join(t for _, t in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for arm, s in summary.items():
        n = max(v["n"] for v in s.values())
        lines.append(f"| {arm} | {n} | " + " | ".join(_fmt(s.get(k), k) for k, _ in keys) + " |")
    for name, v in (baselines or {}).items():
        cells = {k: {"mean": v[k[3:]], "half": None, "n": 1} for k, _ in keys if k.startswith("sr_")}
        lines.append(f"| {name} (no training) | - | " + " | ".join(_fmt(cells.get(k), k) for k, _ in keys) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ figures

def _sheet_seed(out: pathlib.Path, state: dict, arms, seeds) -> tuple[str | None, list[str]]:
    """The first seed whose images every arm finished for it still has on disk, and those arms
    (a study extended after its ``runs/`` folders were removed or moved keeps only study.json)."""
    for seed in map(str, seeds):
        done = [a for a in arms if seed in state["results"].get(a, {})]
        if done and all((out / "runs" / f"seed{seed}" / a / "images.npz").is_file() for a in done):
            return seed, done
    return None, []


def _plots(out: pathlib.Path, state: dict, arms, seeds) -> list[str]:
    """metrics.png (each metric per arm, mean and 95% interval), loss.png (training loss of the
    64 px stage vs its training seconds), samples.png and superres.png (arms side by side), the
    last two and the loss curves from the first seed whose images are still on disk (none
    written when no seed's are). Without matplotlib only the sheets are written (and a
    notice goes to stderr)."""
    from relaydiff.demo import _sheet
    from relaydiff.images import save_png
    written = []
    seed, done = _sheet_seed(out, state, arms, seeds)
    if seed is None:
        print(f"relaydiff study: no sample sheets: no seed's images are left under {out / 'runs'}",
              file=sys.stderr)
    if done:
        packs = {a: np.load(out / "runs" / f"seed{seed}" / a / "images.npz") for a in done}
        n = min(8, len(next(iter(packs.values()))["gen"]))
        gen = _sheet([[packs[a]["gen"][k] for a in done] for k in range(n)], done, per_row=1)
        save_png(np.asarray(gen), out / "samples.png")
        sr_arms = [a for a in done if "sr" in packs[a].files]
        if sr_arms:
            first = packs[sr_arms[0]]
            cells = [[first["input"][k]] + [packs[a]["sr"][k] for a in sr_arms] + [first["truth"][k]]
                     for k in range(n)]
            save_png(np.asarray(_sheet(cells, ["input"] + sr_arms + ["truth"], per_row=1)), out / "superres.png")
            written.append("superres.png")
        written.append("samples.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("relaydiff study: no metrics.png, loss.png, curves.png: matplotlib is not installed "
              "(pip install 'relaydiff[demo]')", file=sys.stderr)
        return written
    summary = state["summary"]
    keys = [(k, t) for k, t, _ in METRICS
            if k.startswith(("gen_", "sr_")) and any(k in s for s in summary.values())]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
        for ax, (k, title) in zip(axes[0], keys):
            names = [a for a in summary if k in summary[a]]
            means = [summary[a][k]["mean"] for a in names]
            errs = [summary[a][k]["half"] or 0.0 for a in names]
            ax.bar(range(len(names)), means, yerr=errs, capsize=3, color="tab:blue")
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=110)
        plt.close(fig)
        written.append("metrics.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in done:
        rec = state["results"][arm][seed]
        path = pathlib.Path(rec["run"]) / "log.jsonl"
        if path.is_file():
            rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            ax.plot([r["seconds"] for r in rows], [r["loss"] for r in rows], label=arm)
    ax.set_xlabel("training seconds (64 px stage)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    written.append("loss.png")
    curves = curve_summary(state["results"], arms, seeds)
    if curves:
        panels = [("gen_swd", f"gen SWD ({N_CURVE} images)"), ("sr_psnr", f"SR PSNR dB ({N_CURVE} images)")]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (key, title) in zip(axes, panels):
            for i, arm in enumerate(arms):   # one colour per arm in both panels
                pts = [p for p in curves.get(arm, []) if key in p]
                if pts:
                    ax.errorbar([p["seconds"] / 60 for p in pts], [p[key]["mean"] for p in pts],
                                yerr=[p[key]["half"] or 0.0 for p in pts], marker="o", capsize=3, label=arm,
                                color=f"C{i}")
            if key == "sr_psnr":
                for name, style in (("nearest", ":"), ("bicubic", "--")):
                    if name in state.get("curve_baselines", {}):
                        ax.axhline(state["curve_baselines"][name], color="gray", ls=style, lw=1,
                                   label=f"{name} (same {N_CURVE} images)")
            ax.set_xlabel("training minutes of the arm (cascades: stage 1 + second stage)")
            ax.set_title(title, fontsize=10)
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
        plt.close(fig)
        written.append("curves.png")
    return written


# ------------------------------------------------------------------------------ the study

def _load_images(folder: str) -> torch.Tensor:
    paths = list_images(folder)
    if len(paths) < 2:
        raise StudyError(f"heldout {folder!r} must hold at least 2 images; found {len(paths)}")
    arrays = [load_image(p) for p in paths]
    bad = [p for p, a in zip(paths, arrays) if a.shape[:2] != (TILE, TILE)]
    if bad:
        raise StudyError(f"heldout images must be {TILE}x{TILE}; {bad[0]!r} is {arrays[paths.index(bad[0])].shape[1]}"
                         f"x{arrays[paths.index(bad[0])].shape[0]}")
    return from_uint8(np.stack(arrays))


def _open_state(cfg: StudyConfig, out: pathlib.Path) -> dict:
    path = out / "study.json"
    settings = cfg.settings()
    if path.is_file():
        try:
            state = json.loads(path.read_text())
            old = state["settings"]
        except (ValueError, KeyError, TypeError):
            raise StudyError(f"{path} is not a study.json this version can read; use a new out folder") from None
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            k = diff[0]
            raise StudyError(f"out {str(out)!r} holds a study with other settings ({k}: {old.get(k)!r} there, "
                             f"{settings.get(k)!r} now); rerun with the same settings to resume, or choose a new out")
        return state
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StudyError(f"out {str(out)!r} exists and holds no study.json; choose a new or empty folder")
    return {"settings": settings, "stage1": {}, "results": {}, "summary": {}}


def _save_state(out: pathlib.Path, state: dict) -> None:
    from relaydiff.models.checkpoint import atomic_write
    text = json.dumps(state, indent=2) + "\n"
    atomic_write(out / "study.json", lambda tmp: pathlib.Path(tmp).write_text(text))


def run_study(cfg: StudyConfig) -> dict:
    """Run (or resume) the study; returns the state written to ``OUT/study.json``
    (``settings``, ``stage1`` per seed, ``results[arm][seed]``, ``summary``, ``baselines``,
    ``files``). Raises :class:`StudyError` for bad settings or an unusable ``out``."""
    from relaydiff.pipeline import load_stage
    from relaydiff.sampling import nearest_upsample
    cfg.validate()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractor = None
    if cfg.inception is not None:    # before anything is written: a bad path leaves no study behind
        from relaydiff.metrics import MissingWeightsError, load_inception
        try:
            extractor = load_inception(cfg.inception, device=device)
        except (ValueError, MissingWeightsError) as e:
            raise StudyError(str(e)) from None
    out = pathlib.Path(cfg.out)
    state = _open_state(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    _save_state(out, state)
    say = (lambda m: None) if cfg.quiet else (lambda m: print(m, flush=True))

    if cfg.data is None:
        data = str(out / "data" / "train.zip")
        if not (out / "data" / "heldout" / "high").is_dir():
            from relaydiff.data.bundled import load_bundled_photos
            try:
                photos = load_bundled_photos()
            except (ImportError, RuntimeError) as e:
                raise StudyError(str(e)) from None
            say("relaydiff study: building the demo's data")
            n = cfg.n_heldout or (SMOKE["n_heldout"] if cfg.smoke else N_HELDOUT)
            build_data(photos, out, n, SMOKE["n_crops"] if cfg.smoke else 2000, seed=0,
                       max_tiles=SMOKE["max_tiles"] if cfg.smoke else None, quiet=cfg.quiet)
        truth, _ = load_heldout(out)
    else:
        data, truth = cfg.data, _load_images(cfg.heldout)
    low_truth = F.avg_pool2d(truth, PATCH)
    metric_names = ("psnr", "ssim", "consistency", "hf_psd", "swd")
    state["baselines"] = {k: {m: float(torch.as_tensor(v[m]).mean()) for m in metric_names}
                          for k, v in superres_scores({
                              "nearest": nearest_upsample(low_truth, PATCH),
                              "bicubic": F.interpolate(low_truth, scale_factor=PATCH, mode="bicubic",
                                                       align_corners=False).clamp(-1, 1)}, truth).items()}
    k = min(N_CURVE, truth.shape[0])   # the curves' images: their own nearest / bicubic references
    state["curve_baselines"] = {name: float(v["psnr"].mean()) for name, v in superres_scores({
        "nearest": nearest_upsample(low_truth[:k], PATCH),
        "bicubic": F.interpolate(low_truth[:k], scale_factor=PATCH, mode="bicubic", align_corners=False).clamp(-1, 1)},
        truth[:k]).items()}
    ref_stats = None
    if extractor is not None:
        from relaydiff.metrics import compute_stats
        ref_stats = compute_stats(truth, extractor, device=device, progress=False)
    n = truth.shape[0]
    s1_steps = SMOKE["stage1_steps"] if cfg.smoke else EDM_STEPS

    jobs = [(a, s) for s, a in itertools.product(cfg.seeds, cfg.arms)]
    todo = [(a, s) for a, s in jobs if str(s) not in state["results"].get(a, {})]
    if len(todo) < len(jobs):
        say(f"relaydiff study: {len(jobs) - len(todo)} of {len(jobs)} (arm, seed) results already in study.json")
    stage1_cache: dict[int, tuple] = {}
    for arm, seed in tqdm(todo, desc="study", unit="arm", disable=cfg.quiet):
        a = ARMS[arm]
        root = out / "runs" / f"seed{seed}"
        say(f"relaydiff study: arm {arm}, seed {seed}")
        rec: dict = {}
        if a.kind in ("cascade", "cdm"):
            if str(seed) not in state["stage1"]:
                state["stage1"][str(seed)] = _train(stage_config(arm, "base", cfg, data, root / "stage1", seed))
                _save_state(out, state)
            s1 = state["stage1"][str(seed)]
            if seed not in stage1_cache:
                base, _ = load_stage(s1["run"], "base", device=device)
                low_gen, t1 = _timed(lambda: sample_edm_batches(base, n, LOW, s1_steps, seed, device=device), device)
                stage1_cache[seed] = (low_gen[0], low_gen[1], t1)
            low_gen, nfe16, t1 = stage1_cache[seed]
            if a.kind == "cascade":
                tr = _train(stage_config(arm, "relay", cfg, data, root / arm, seed))
            else:
                tr, _ = train_cdm(cfg, data, root / arm, seed)
            gen, sr, nfe64, t2 = _outputs(a, _final(a, tr["run"], device), cfg, seed, device, n, low_gen, low_truth)
            rec.update(nfe_16=nfe16, s_per_image=(t1 + t2) / n, stage1_train_s=s1["train_s"])
            offset = s1["train_s"]
        else:
            tr = _train(stage_config(arm, "base", cfg, data, root / arm, seed))
            low_gen = None
            gen, sr, nfe64, t2 = _outputs(a, _final(a, tr["run"], device), cfg, seed, device, n, None, None)
            rec.update(nfe_16=0, s_per_image=t2 / n)
            offset = 0.0
        k = min(N_CURVE, n)
        curve = []
        for step, seconds, path in tqdm(_snapshot_list(a, tr["run"]), desc=f"{arm} snapshots", unit="snapshot",
                                        disable=cfg.quiet, leave=False):
            g, s, _, _ = _outputs(a, _load_snapshot(a, path, device), cfg, seed, device, k,
                                  None if low_gen is None else low_gen[:k], None if sr is None else low_truth[:k])
            curve.append({"step": step, "seconds": offset + seconds, **_curve_scores(g, s, truth[:k])})
        curve.append({"step": tr["steps"], "seconds": offset + tr["train_s"],
                      **_curve_scores(gen[:k], None if sr is None else sr[:k], truth[:k])})
        rec["curve"] = curve
        rec.update(_score(gen, sr, truth, extractor, ref_stats, device), nfe_64=nfe64, train_steps=tr["steps"],
                   train_s=tr["train_s"], kimg=tr["kimg"], run=tr["run"])
        pack = {"gen": to_uint8(gen)}
        if sr is not None:
            pack.update(sr=to_uint8(sr), input=to_uint8(nearest_upsample(low_truth, PATCH)), truth=to_uint8(truth))
        np.savez_compressed(root / arm / "images.npz", **pack)
        state["results"].setdefault(arm, {})[str(seed)] = rec
        state["summary"] = summarize(state["results"], cfg.arms, cfg.seeds)
        _save_state(out, state)

    state["summary"] = summarize(state["results"], cfg.arms, cfg.seeds)
    table = markdown_table(state["summary"], state["baselines"])
    reference = "relay" if "relay" in cfg.arms else cfg.arms[0]
    state["paired"] = {"reference": reference,
                       "arms": paired_differences(state["results"], cfg.arms, cfg.seeds, reference)}
    table += "\n" + paired_table(state["paired"]["arms"], reference)
    (out / "study.md").write_text(_report(cfg, table))
    state["files"] = ["study.json", "study.md"] + _plots(out, state, cfg.arms, cfg.seeds)
    _save_state(out, state)
    return state


def _report(cfg: StudyConfig, table: str) -> str:
    budget = (f"{SMOKE['steps']} optimizer steps per stage (smoke)" if cfg.smoke else
              f"{cfg.minutes} min of training per arm" if cfg.minutes is not None else f"{cfg.kimg} kimg per arm")
    arms = "\n".join(f"- `{a}`: {ARMS[a].description}" for a in cfg.arms)
    return (f"# relaydiff study\n\nBudget: {budget}; cascades and cdm give {BASE_SHARE:.0%} of it to the shared "
            f"16 px stage 1. Seeds: {', '.join(map(str, cfg.seeds))}. Cells: mean ± half-width of the 95% t "
            f"interval over seeds. gen: {TILE} px samples vs the held-out images; SR: super-resolution of the "
            f"held-out images' {PATCH}x box-downsamples. docs/study.md defines the metrics.\n\n{arms}\n\n{table}")
