"""``train(cfg)``: the training loop for both stages (single process or ``torchrun`` DDP).

Per optimizer step: ``accum`` rounds of forward/backward on ``batch / (world * accum)`` images
per process (loss = per-image sum of the weighted squared error, averaged over the batch, as
in EDM), then the NaN/Inf guard (a step whose gradient norm is not finite is skipped and
counted), optional clipping, Adam with linear warm-up, and the EMA update with half-life
``ema_halflife_kimg`` (capped at ``ema_rampup`` x images seen).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import pathlib
import time
import warnings

import torch
import torch.nn.functional as F

from relaydiff.data import ImageDataset, InfiniteSampler, uint8_to_float
from relaydiff.diffusion import EDMLoss, RelayLoss
from relaydiff.images import ImageError
from relaydiff.models import EDMPrecond, build_model, network_kwargs
from relaydiff.models.checkpoint import atomic_write

from . import distributed, preview
from .augment import AUGMENT_DIM, GeometricAugment
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig


def _prepare_run_dir(cfg: TrainConfig) -> pathlib.Path | None:
    """Check the run directory against ``resume``; returns the checkpoint to resume from."""
    out = pathlib.Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {cfg.out!r} exists and is not a directory")
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    if ckpt is not None and not cfg.resume:
        raise ConfigError(f"out {cfg.out!r} already holds a run; pass resume=True (--resume) to continue "
                         "it, or choose another directory")
    return ckpt


def _meta(cfg: TrainConfig, net_kwargs: dict, model: EDMPrecond, step: int, nimg: int, label_dim: int) -> dict:
    return {"stage": cfg.stage, "network": net_kwargs, "precond": model.config(),
            "relay": cfg.relay.to_dict() if cfg.relay is not None else None,
            "block_noise": cfg.base_noise().to_dict() if cfg.stage == "base" else None,
            "step": step, "kimg": nimg / 1000, "resolution": cfg.resolution, "label_dim": label_dim,
            "preset": cfg.preset}


def _truncate_log(path: pathlib.Path, step: int) -> None:
    """Drop log lines written after ``step`` by a run that is being resumed from ``step``."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text("".join(ln + "\n" for ln in keep)))


def random_crop(images: torch.Tensor, size: int, align: int = 1) -> torch.Tensor:
    """One random ``size x size`` window per image of ``images`` ``[B, C, R, R]``, its corner on
    a multiple of ``align`` (the relay patch grid, so a crop's patches are patches of the image).
    Offsets come from torch's global generator (saved with the checkpoint: resume-exact)."""
    b, r = images.shape[0], images.shape[-1]
    slots = (r - size) // align + 1
    ys, xs = (torch.randint(slots, (2, b)) * align).tolist()
    return torch.stack([images[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(zip(ys, xs))])


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - beta)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


@torch.no_grad()
def _weight_checksum(model: torch.nn.Module) -> tuple[float, float]:
    """``(sum, sum of squares)`` of all parameters in float64: equal on every process while
    the DDP replicas agree (stored in each checkpoint's state)."""
    s = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        q = p.detach().double()
        s += torch.stack([q.sum(), q.square().sum()])
    return float(s[0]), float(s[1])


class _Preview:
    """Fixed inputs for the sample grids (same noise/images every time)."""

    def __init__(self, cfg: TrainConfig, dataset: ImageDataset, device: torch.device):
        self.cfg = cfg
        n = cfg.sample_count
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(dataset.num_images, generator=g)[:n].tolist()
        self.labels = None
        if dataset.label_dim:
            cls = torch.arange(n) % dataset.label_dim if cfg.stage == "base" else torch.tensor(
                [dataset[i][1] for i in idx])
            self.labels = F.one_hot(cls, dataset.label_dim).float().to(device)
        self.real = uint8_to_float(torch.stack([dataset[i][0] for i in idx])).to(device) \
            if cfg.stage == "relay" else None

    def write(self, ema: EDMPrecond, path: pathlib.Path) -> None:
        if self.cfg.stage == "base":
            rows = [preview.base_samples(ema, self.cfg.sample_count, self.labels, seed=self.cfg.seed,
                                         noise=self.cfg.base_noise())]
        else:
            low, samples = preview.relay_samples(ema, self.real, self.labels, self.cfg.relay, seed=self.cfg.seed)
            rows = [low, samples, self.real]
        preview.save_grid(path, rows)


def _batches(loader):
    """The loader's batches; an unusable image file (``ImageError``, also when a worker process
    raised it) becomes a ``ConfigError`` naming it."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except ImageError as e:
            raise ConfigError(str(e)) from None
        yield batch


def _resume(resume_from: pathlib.Path, cfg: TrainConfig, net_kwargs: dict, model, ema, opt, scaler,
            d: distributed.Dist) -> tuple[int, int, int, int]:
    """Restore weights, optimizer, scaler and RNG from a checkpoint; returns ``(step, nimg,
    skipped, data_pos)``. A checkpoint that does not fit this run, or is malformed, raises
    ``ConfigError`` naming it."""
    dev = d.device
    try:
        tensors, meta, state = load_checkpoint(resume_from)
        if meta["network"] != net_kwargs or meta["stage"] != cfg.stage:
            raise ConfigError(f"cannot resume {resume_from}: it was trained with stage {meta['stage']!r} and "
                             f"network {meta['network']}, this run asks for stage {cfg.stage!r} and {net_kwargs}")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        opt.load_state_dict(state["optimizer"])
        if state["scaler"]:   # empty when saved without float16 loss scaling
            scaler.load_state_dict(state["scaler"])
        step, nimg, skipped = state["step"], state["nimg"], state["skipped"]
        if state["world"] == d.world:
            torch.set_rng_state(state["rng"][d.rank])
            data_pos = state["data_pos"][d.rank]
        else:   # another process count: a valid continuation, but not the identical one
            data_pos = step * cfg.batch // d.world
        if dev.type == "cuda" and state.get("cuda_rng") and state["world"] == d.world:
            torch.cuda.set_rng_state(state["cuda_rng"][d.rank])
    except ConfigError:
        raise
    except Exception as e:   # a file's values, not code, decide what fails here: any type may be wrong
        raise ConfigError(f"cannot resume {resume_from}: malformed checkpoint ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None
    return step, nimg, skipped, data_pos


def train(cfg: TrainConfig) -> pathlib.Path:
    """Train one stage as ``cfg`` says and return the run directory (loadable with
    :func:`relaydiff.models.load_model`). Bad options or data raise ``ConfigError`` (a
    ``ValueError``) before anything is written."""
    cfg = cfg.resolved()
    try:
        resume_from = _prepare_run_dir(cfg)
    except (ValueError, OSError) as e:   # a run directory whose checkpoints/latest is broken
        raise ConfigError(str(e)) from None
    try:
        dataset = ImageDataset(cfg.data, cfg.resolution, xflip=cfg.xflip,
                               labels="auto" if cfg.labels is None else cfg.labels, cache=cfg.cache)
        d = distributed.setup(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        return _train(cfg, dataset, d, resume_from)
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, dataset: ImageDataset, d: distributed.Dist,
           resume_from: pathlib.Path | None) -> pathlib.Path:
    if cfg.batch % (d.world * cfg.accum):
        raise ConfigError(f"batch {cfg.batch} must be divisible by processes x accum = {d.world} x {cfg.accum}")
    micro = cfg.batch // (d.world * cfg.accum)
    total = cfg.total_steps(cfg.batch)
    run_dir = pathlib.Path(cfg.out)
    dev = d.device
    label_dim = dataset.label_dim

    # the same initial weights on every process; per-process noise afterwards
    torch.manual_seed(cfg.seed)
    # augment_dim only when augmenting: runs without it keep their network keywords (resume)
    net_kwargs = network_kwargs(cfg.preset, cfg.resolution, label_dim=label_dim, dropout=cfg.dropout,
                                **({"augment_dim": AUGMENT_DIM} if cfg.augment > 0 else {}))
    model = build_model(net_kwargs).to(dev).train()
    model.model.gradient_checkpointing = cfg.grad_checkpointing
    model.amp = cfg.amp
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.amp == "float16")
    torch.manual_seed(cfg.seed * 1000003 + d.rank + 1)

    step, nimg, skipped, data_pos = 0, 0, 0, 0
    if resume_from is not None:
        step, nimg, skipped, data_pos = _resume(resume_from, cfg, net_kwargs, model, ema, opt, scaler, d)

    augment = GeometricAugment(cfg.augment) if cfg.augment > 0 else None
    loss_fn = (EDMLoss(label_dropout=cfg.label_dropout, augment=augment, noise=cfg.base_noise())
               if cfg.stage == "base"
               else RelayLoss(cfg.relay, label_dropout=cfg.label_dropout, augment=augment))
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if d.active else model
    net = torch.compile(ddp) if cfg.compile else ddp

    workers = cfg.workers if cfg.workers is not None else (0 if dataset.cached else 4)
    sampler = InfiniteSampler(len(dataset), rank=d.rank, world=d.world, seed=cfg.seed, start=data_pos)
    # a private generator: creating the iterator must not consume the global RNG (resume equivalence)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=workers,
                                         pin_memory=dev.type == "cuda", persistent_workers=workers > 0,
                                         prefetch_factor=2 if workers else None,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    batches = _batches(loader)
    # the first batch is decoded before anything is written: a broken image among the first
    # ones (or any, when --workers 0 caches them) ends the run with nothing left behind
    batches = itertools.chain([next(batches)], batches)

    previewer = _Preview(cfg, dataset, dev) if d.is_main and cfg.sample_every >= 0 else None
    log_path = run_dir / "log.jsonl"
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, step)
        atomic_write(run_dir / "config.json", lambda tmp: pathlib.Path(tmp).write_text(
            json.dumps({**cfg.to_dict(), "network": net_kwargs, "world": d.world}, indent=2) + "\n"))

    def checkpoint() -> None:
        rng = d.all_gather_object(torch.get_rng_state())
        cuda_rng = d.all_gather_object(torch.cuda.get_rng_state(dev)) if dev.type == "cuda" else None
        pos = d.all_gather_object(data_pos)
        sums = d.all_gather_object(_weight_checksum(model))
        if d.is_main:
            if any(s != sums[0] for s in sums):
                warnings.warn(f"relaydiff train: the processes' weights differ at step {step} "
                              f"(checksums {sums}); DDP replicas have diverged", RuntimeWarning)
            state = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "step": step, "nimg": nimg,
                     "skipped": skipped, "world": d.world, "rng": rng, "cuda_rng": cuda_rng, "data_pos": pos,
                     "weight_checksums": sums}
            save_checkpoint(run_dir, step, model, ema, _meta(cfg, net_kwargs, model, step, nimg, label_dim),
                            state, keep=cfg.keep)

    def samples() -> None:
        if previewer is not None:
            previewer.write(ema, run_dir / "samples" / f"step-{step:07d}.png")

    # a kill between a checkpoint and its preview grid: the resumed run makes the grid it owes first
    # (with the random state set aside, so that the continuation stays the uninterrupted one)
    owed = cfg.sample_every >= 0 and step > 0 and (
        (cfg.sample_every > 0 and step % cfg.sample_every == 0) or (total is not None and step >= total))
    if resume_from is not None and owed and not (run_dir / "samples" / f"step-{step:07d}.png").exists():
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            samples()

    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, disable=cfg.quiet or not d.is_main)
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.monotonic()
    t_log, step_log, t_checkpoint = start, step, start
    loss_sum = torch.zeros(2, dtype=torch.float64, device=dev)   # sum of per-element means, count
    grad_norm = float("nan")
    while total is None or step < total:
        lr = cfg.lr * (min(nimg / (cfg.warmup_kimg * 1000), 1.0) if cfg.warmup_kimg > 0 else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        for r in range(cfg.accum):
            images, labels = next(batches)
            images = uint8_to_float(images.to(dev, non_blocking=True))
            if cfg.crop is not None and cfg.crop < images.shape[-1]:
                images = random_crop(images, cfg.crop, cfg.relay.patch_size if cfg.relay else 1)
            onehot = F.one_hot(labels.to(dev), label_dim).float() if label_dim else None
            sync = r == cfg.accum - 1 or not d.active
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                loss = loss_fn(net, images, onehot)
                scaler.scale(loss.sum() / (micro * cfg.accum)).backward()
            loss_sum += torch.stack([loss.detach().mean().double(), loss.new_ones((), dtype=torch.float64)])
            data_pos += micro
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else math.inf)
        if torch.isfinite(norm):
            scaler.step(opt)
            grad_norm = float(norm)
        else:
            skipped += 1
        scaler.update()
        opt.zero_grad(set_to_none=True)
        nimg += cfg.batch
        step += 1

        halflife = cfg.ema_halflife_kimg * 1000
        if cfg.ema_rampup is not None:
            halflife = min(halflife, nimg * cfg.ema_rampup)
        _update_ema(ema, model, 0.5 ** (cfg.batch / max(halflife, 1e-8)))
        bar.update(1)

        stop = total is not None and step >= total
        if cfg.minutes is not None:
            stop = d.any(stop or time.monotonic() - start >= cfg.minutes * 60)
        if step % cfg.log_every == 0 or stop:
            d.all_reduce_sum(loss_sum)
            now = time.monotonic()
            rec = {"step": step, "kimg": nimg / 1000, "loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
                   "lr": lr, "grad_norm": grad_norm, "images_per_s": (step - step_log) * cfg.batch / (now - t_log),
                   "skipped": skipped, "seconds": now - start}
            loss_sum.zero_()
            t_log, step_log = now, step
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}")
            if d.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        timed = cfg.checkpoint_minutes is not None and d.any(
            time.monotonic() - t_checkpoint >= cfg.checkpoint_minutes * 60)
        if step % cfg.checkpoint_every == 0 or stop or timed:
            checkpoint()
            t_checkpoint = time.monotonic()
        if (cfg.sample_every > 0 and step % cfg.sample_every == 0) or (stop and cfg.sample_every >= 0):
            samples()
        if stop:
            break
    bar.close()
    d.barrier()
    return run_dir
