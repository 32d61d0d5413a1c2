"""``relaydiff demo``: a whole relay cascade, trained and sampled on a laptop, offline.

1. **Data.** The real photos bundled with scikit-image and scikit-learn
   (:mod:`relaydiff.data.bundled`) are cut into non-overlapping 64 x 64 tiles (flat ones, e.g.
   the black border of the retina photo, are dropped) plus random crops of 64-192 px resized
   to 64 (Lanczos), written to ``OUT/data/train.zip``. A few tiles, one per photo, are held
   out, and no crop overlaps them: they are the super-resolution test set
   (``OUT/data/heldout/``). Training adds random horizontal flips.
2. **Training** (:func:`relaydiff.training.train`): a stage-1 model (preset ``tiny``) on the
   images resized to 16 x 16, then a relay model 16 -> 64 (preset ``tiny-relay``: patch 4,
   block noise 4, alpha 0.15, truncation 0.15, 32 px crops), within one wall-clock budget for
   the whole demo: what remains after the data is built, less an estimate of the sampling
   time, is split ``BASE_SHARE`` / ``1 - BASE_SHARE`` between the stages.
3. **Sampling** (:class:`relaydiff.pipeline.RelayPipeline`, the ``short`` sampler preset: the
   relay stage from its trained top sigma in 2 levels, with patch-mean consistency):
   ``OUT/samples.png`` shows per sample the 16 px stage-1 image (at its size), its nearest
   upsample (where the relay stage starts) and the relay output; ``OUT/superres.png`` shows
   per held-out tile the 16 px box-downsampled input, bicubic, the relay output at 2 and at
   ``DETAIL_LEVELS`` levels and the ground truth; ``OUT/spectrum.png`` their radial power
   spectra; ``OUT/metrics.json`` the demo's scores (:func:`superres_scores`) of each.

Nothing is downloaded. The device is CUDA when present; the same budget then buys many more
optimizer steps.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import pathlib
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from relaydiff.images import center_square, from_uint8, save_png, to_uint8

TILE = 64            # high resolution (px)
PATCH = 4            # relay factor: 16 -> 64
LOW = TILE // PATCH
FLAT_STD = 8.0       # tiles whose pixel std (uint8 units) is below this are dropped
CROP_MAX = 192       # random crops of TILE..CROP_MAX px, resized to TILE
BASE_SHARE = 0.25    # of the training time to stage 1: its loss flattens sooner than the relay stage's
BASE_PRESET, RELAY_PRESET = "tiny", "tiny-relay"   # relaydiff.models.PRESETS
SAMPLER = "short"    # relaydiff.sampling.PRESETS: the relay stage from its trained top, few levels
DETAIL_LEVELS = 16   # a second super-resolution at this many levels: more detail, lower PSNR (docs/demo.md)

# sheet layout (samples.png, superres.png): TILE px cells, CELL_GAP px apart inside a triplet,
# GROUP_GAP px between triplets and around the border, a HEADER px title band on top
CELL_GAP, GROUP_GAP, HEADER = 2, 8, 16


class DemoError(ValueError):
    """A setting, the output folder or the installed packages do not allow the demo; raised
    before anything is written."""


@dataclasses.dataclass
class DemoConfig:
    """Settings of :func:`run_demo`; ``None`` counts take the default (or smoke) size."""
    out: str = "demo_out"             # output folder (must not exist or be empty)
    minutes: float = 14.0             # wall-clock budget for the whole demo
    smoke: bool = False               # tiny data and 2 optimizer steps per stage (CI)
    seed: int = 0
    device: str | None = None         # None: CUDA when available
    quiet: bool = False               # no progress bars
    n_samples: int | None = None      # generated samples (default 16; smoke 4)
    n_heldout: int | None = None      # held-out tiles for super-resolution (default 8; smoke 2)
    n_crops: int | None = None        # random crops added to the tiles (default 2000; smoke 8)

    def resolved(self) -> "DemoConfig":
        c = dataclasses.replace(self)
        c.n_samples = c.n_samples if c.n_samples is not None else (4 if c.smoke else 16)
        c.n_heldout = c.n_heldout if c.n_heldout is not None else (2 if c.smoke else 8)
        c.n_crops = c.n_crops if c.n_crops is not None else (8 if c.smoke else 2000)
        if not (isinstance(c.minutes, (int, float)) and math.isfinite(c.minutes) and c.minutes > 0):
            raise DemoError(f"minutes must be a positive number; got {c.minutes!r}")
        for name in ("n_samples", "n_heldout"):
            v = getattr(c, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
                raise DemoError(f"{name} must be an integer in [1, 64]; got {v!r}")
        if isinstance(c.n_crops, bool) or not isinstance(c.n_crops, int) or c.n_crops < 0:
            raise DemoError(f"n_crops must be an integer >= 0; got {c.n_crops!r}")
        if isinstance(c.seed, bool) or not isinstance(c.seed, int) or c.seed < 0:
            raise DemoError(f"seed must be an integer >= 0; got {c.seed!r}")
        return c


# ------------------------------------------------------------------------------------ data

@dataclasses.dataclass
class DemoData:
    train_zip: pathlib.Path
    n_train: int                  # images in the zip (tiles + crops)
    n_tiles: int
    heldout: torch.Tensor         # [n_heldout, 3, TILE, TILE] in [-1, 1], ground truth
    heldout_names: list[str]


def _tiles(photo: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners of the non-flat, non-overlapping TILE x TILE tiles of ``photo``."""
    h, w = photo.shape[:2]
    return [(y, x) for y in range(0, h - TILE + 1, TILE) for x in range(0, w - TILE + 1, TILE)
            if photo[y:y + TILE, x:x + TILE].std() >= FLAT_STD]


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def build_data(photos: dict[str, np.ndarray], out: pathlib.Path, n_heldout: int, n_crops: int, seed: int = 0,
               max_tiles: int | None = None, quiet: bool = False) -> DemoData:
    """From ``photos`` (name -> uint8 ``[H, W, 3]``, e.g. ``load_bundled_photos()``) write
    ``out/data/train.zip`` (``tile_PHOTO_Y_X.png`` and ``crop_K_PHOTO_Y_X_SIZE.png``; flat
    names, so the training is unconditional) and the held-out tiles
    ``out/data/heldout/{high,low}/NAME.png`` (64 px ground truth, 16 px box-downsampled
    input); see the module docstring. ``max_tiles`` caps the training tiles (a random
    subset), for smoke runs."""
    rng = np.random.default_rng(seed)
    names = list(photos)
    tiles = {name: _tiles(photos[name]) for name in names}
    # one held-out tile per photo (photos in random order), so the test set is diverse
    held: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    order = rng.permutation(len(names))
    for k in range(n_heldout):
        name = names[order[k % len(names)]]
        free = [t for t in tiles[name] if t not in held[name]]
        held[name].append(free[rng.integers(len(free))])
    train_tiles = [(name, t) for name in names for t in tiles[name] if t not in held[name]]
    if max_tiles is not None and len(train_tiles) > max_tiles:
        train_tiles = [train_tiles[i] for i in sorted(rng.choice(len(train_tiles), max_tiles, replace=False))]

    def overlaps_held(name: str, y: int, x: int, s: int) -> bool:
        return any(y < hy + TILE and hy < y + s and x < hx + TILE and hx < x + s for hy, hx in held[name])

    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    zip_path = data_dir / "train.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, (y, x) in tqdm(train_tiles, desc="tiles", unit="img", disable=quiet, leave=False):
            z.writestr(f"tile_{name}_{y:04d}_{x:04d}.png", _png(photos[name][y:y + TILE, x:x + TILE]))
        done, tries = 0, 0
        bar = tqdm(total=n_crops, desc="crops", unit="img", disable=quiet, leave=False)
        while done < n_crops:
            tries += 1
            if tries > 100 * n_crops:
                raise ValueError(f"only {done} of {n_crops} random crops were neither flat nor overlapping "
                                 "a held-out tile; the photos are too small or too flat")
            name = names[rng.integers(len(names))]   # photos equally likely, whatever their size
            photo = photos[name]
            h, w = photo.shape[:2]
            s = int(rng.integers(TILE, min(CROP_MAX, h, w) + 1))
            y, x = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1))
            crop = photo[y:y + s, x:x + s]
            if overlaps_held(name, y, x, s) or crop.std() < FLAT_STD:
                continue
            z.writestr(f"crop_{done:05d}_{name}_{y:04d}_{x:04d}_{s:03d}.png", _png(center_square(crop, TILE)))
            done += 1
            bar.update(1)
        bar.close()

    held_list = [(name, t) for name in names for t in held[name]]
    high = np.stack([photos[name][y:y + TILE, x:x + TILE] for name, (y, x) in held_list])
    heldout = from_uint8(high)
    held_names = [f"{name}_{y:04d}_{x:04d}" for name, (y, x) in held_list]
    low = to_uint8(F.avg_pool2d(heldout, PATCH))
    for sub, imgs in (("high", high), ("low", low)):
        (data_dir / "heldout" / sub).mkdir(parents=True, exist_ok=True)
        for nm, img in zip(held_names, imgs):
            save_png(np.ascontiguousarray(img), data_dir / "heldout" / sub / f"{nm}.png")
    return DemoData(zip_path, len(train_tiles) + n_crops, len(train_tiles), heldout, held_names)


def load_heldout(out) -> tuple[torch.Tensor, list[str]]:
    """The held-out tiles ``build_data`` wrote under ``out/data/heldout/high`` (sorted by
    name): ``([N, 3, TILE, TILE]`` in [-1, 1], names)``."""
    paths = sorted((pathlib.Path(out) / "data" / "heldout" / "high").glob("*.png"))
    if not paths:
        raise ValueError(f"{out}/data/heldout/high holds no held-out tiles; run build_data first")
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("RGB")))
    return from_uint8(np.stack(images)), [p.stem for p in paths]


# ------------------------------------------------------------------------------- figures

SCALE = 2            # sheet cells show each pixel as SCALE x SCALE


def sheet_size(n_groups: int, per_group: int, per_row: int, captions: bool) -> tuple[int, int]:
    """``(width, height)`` of a sheet of ``n_groups`` groups of ``per_group`` cells."""
    cell = TILE * SCALE
    rows = math.ceil(n_groups / per_row)
    width = per_row * (per_group * cell + (per_group - 1) * CELL_GAP) + (per_row + 1) * GROUP_GAP
    height = HEADER + GROUP_GAP + rows * (cell + (HEADER if captions else 0) + GROUP_GAP)
    return width, height


def _sheet(groups: list[list[np.ndarray]], titles: list[str], per_row: int,
           captions: list[str] | None = None) -> Image.Image:
    """Lay out groups of uint8 ``[TILE, TILE, 3]`` cells, ``per_row`` groups a row, ``titles``
    above each group's cells and an optional caption under each group."""
    from PIL import ImageDraw, ImageFont
    k, cell = len(titles), TILE * SCALE
    width, height = sheet_size(len(groups), k, per_row, captions is not None)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    group_w = k * cell + (k - 1) * CELL_GAP
    row_h = cell + (HEADER if captions is not None else 0) + GROUP_GAP
    for q in range(min(per_row, len(groups))):
        for j, title in enumerate(titles):
            x = GROUP_GAP + q * (group_w + GROUP_GAP) + j * (cell + CELL_GAP)
            draw.text((x + cell // 2, HEADER // 2 + 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    for g, cells in enumerate(groups):
        r, q = divmod(g, per_row)
        x0, y0 = GROUP_GAP + q * (group_w + GROUP_GAP), HEADER + GROUP_GAP + r * row_h
        for j, img in enumerate(cells):
            if img.shape != (TILE, TILE, 3):
                raise ValueError(f"sheet cells must be [{TILE}, {TILE}, 3]; got {list(img.shape)}")
            big = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
            sheet.paste(big, (x0 + j * (cell + CELL_GAP), y0))
        if captions is not None:
            draw.text((x0 + group_w // 2, y0 + cell + HEADER // 2 + 1), captions[g], fill=(0, 0, 0), font=font,
                      anchor="mm")
    return sheet


def _centered(low: np.ndarray) -> np.ndarray:
    """A ``[LOW, LOW, 3]`` image at its size in the middle of a grey ``[TILE, TILE, 3]`` cell."""
    cell = np.full((TILE, TILE, 3), 200, dtype=np.uint8)
    o = (TILE - LOW) // 2
    cell[o:o + LOW, o:o + LOW] = low
    return cell


# ----------------------------------------------------------------------------- scoring

def superres_scores(candidates: dict[str, torch.Tensor], truth: torch.Tensor) -> dict:
    """The demo's metric (docs/demo.md) of each super-resolution in ``candidates`` (name ->
    ``[N, 3, TILE, TILE]`` in [-1, 1]) against ``truth``, all quantised to uint8 as the PNGs
    are: per-tile PSNR and SSIM (RGB, data range 2), ``consistency`` (PSNR of the candidate's
    PATCH x PATCH box-downsample against the truth's: does it reproduce its input), the
    set's ``hf_psd`` (:func:`relaydiff.analysis.high_frequency_error` against the truth: mean
    ``|ln PSD ratio|`` over [pi/2, pi]) and ``swd`` (sliced Wasserstein distance x 1e3 of every
    7 x 7 neighbourhood on a Laplacian pyramid, :func:`relaydiff.metrics.swd` with
    ``nhoods=None``, 16 x 128 directions, mean over levels: on 8 tiles, ProGAN's 128 random
    neighbourhoods per image left a spread of +-4 between seeds and 26 between the truth and
    itself reordered; this reading is 0 there and varies by +-0.4 with the seed).
    Returns ``{name: {"psnr": [N], "ssim": [N], "consistency": [N], "hf_psd": float, "swd": float}}``."""
    from relaydiff.analysis import high_frequency_error
    from relaydiff.metrics import psnr, ssim, swd
    q = lambda x: from_uint8(to_uint8(x))  # noqa: E731
    truth_q = q(truth)
    low_truth = F.avg_pool2d(truth_q, PATCH)
    out = {}
    for name, x in candidates.items():
        xq = q(x)
        out[name] = {"psnr": psnr(xq, truth_q), "ssim": ssim(xq, truth_q),
                     "consistency": psnr(F.avg_pool2d(xq, PATCH), low_truth),
                     "hf_psd": high_frequency_error(xq, truth_q),
                     "swd": swd(xq, truth_q, nhoods=None, repeats=16)["swd_mean"]}
    return out


# ------------------------------------------------------------------------------ the demo

SMOKE_STEPS = 2               # optimizer steps per stage with smoke=True
SMOKE_TILES = 24              # training tiles with smoke=True
SMOKE_SAMPLER = (8, 2)        # stage-1 and relay grid sizes with smoke=True
BASE_BATCH = 16               # stage 1 at 16 px: larger batches cost little per image
SAMPLE_BATCH = 16


def _pick_device(name: str | None) -> torch.device:
    return torch.device(name if name else ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def estimate_sampling_seconds(device: torch.device, n_samples: int, n_heldout: int, steps=None) -> float:
    """Seconds the sampling phase will take: one timed forward pass of an untrained relay
    network, times the relay and stage-1 calls the ``SAMPLER`` preset makes (and the
    ``DETAIL_LEVELS`` super-resolution), with a 1.5x margin and 30 s for the metrics, the
    figures and writing files."""
    from relaydiff.models import build_model, network_kwargs
    from relaydiff.sampling import get_preset
    preset = get_preset(SAMPLER)
    if steps is not None:
        preset = preset.with_steps(*steps)
    relay_nfe = 2 * (preset.relay.sigmas(trained_max=1.0).numel() - 1) - 1
    detail_nfe = 2 * DETAIL_LEVELS - 1 if steps is None else relay_nfe
    base_nfe = 2 * preset.stage1.steps - 1
    net = build_model(network_kwargs(RELAY_PRESET, TILE, label_dim=0)).to(device).eval()
    b = min(SAMPLE_BATCH, max(n_samples, n_heldout))
    x, sigma = torch.zeros(b, 3, TILE, TILE, device=device), torch.ones(b, device=device)
    net(x, sigma)                                    # warm-up (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    net(x, sigma)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_image = (time.perf_counter() - t) / b
    # stage 1 runs at 1/PATCH^2 of the pixels
    calls = relay_nfe * (n_samples + n_heldout) + detail_nfe * n_heldout + base_nfe * n_samples / PATCH ** 2
    return 1.5 * calls * per_image + 30.0


def _train_stage(stage: str, data: DemoData, run_dir: pathlib.Path, cfg: DemoConfig, minutes: float | None):
    """``relaydiff.training.train`` for one stage; returns ``(run_dir, steps, train_seconds, wall_seconds)``."""
    from relaydiff.training import TrainConfig, train
    t = time.monotonic()
    run = train(TrainConfig(
        stage=stage, data=str(data.train_zip), out=str(run_dir),
        preset=BASE_PRESET if stage == "base" else RELAY_PRESET,
        resolution=LOW if stage == "base" else TILE, batch=BASE_BATCH if stage == "base" else None,
        steps=SMOKE_STEPS if cfg.smoke else None, minutes=None if cfg.smoke else max(minutes, 0.0),
        labels=False, cache=True, workers=0, seed=cfg.seed + (stage == "relay"), device=cfg.device,
        quiet=cfg.quiet, log_every=25, checkpoint_every=10 ** 9, sample_every=-1, keep=1))
    wall = time.monotonic() - t
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    return run, int(last["step"]), float(last["seconds"]), wall


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo (see the module docstring) and return its summary (also written to
    ``OUT/summary.json``). Raises :class:`DemoError` for bad settings, an ``OUT`` that holds
    files, or missing scikit-image/scikit-learn photos, before writing anything."""
    from relaydiff.data.bundled import load_bundled_photos
    from relaydiff.pipeline import RelayPipeline
    from relaydiff.sampling import nearest_upsample

    start = time.monotonic()
    cfg = cfg.resolved()
    out = pathlib.Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DemoError(f"out {cfg.out!r} already exists and is not an empty directory; "
                        "remove it or choose another")
    device = _pick_device(cfg.device)
    try:
        photos = load_bundled_photos()
    except (ImportError, RuntimeError) as e:
        raise DemoError(str(e)) from None
    say = (lambda msg: None) if cfg.quiet else (lambda msg: print(msg, flush=True))
    timings: dict[str, float] = {}

    say(f"relaydiff demo: building the training set from {len(photos)} bundled photos")
    data = build_data(photos, out, cfg.n_heldout, cfg.n_crops, seed=cfg.seed,
                      max_tiles=SMOKE_TILES if cfg.smoke else None, quiet=cfg.quiet)
    timings["data_s"] = time.monotonic() - start

    sampler_steps = SMOKE_SAMPLER if cfg.smoke else None
    deadline = start + cfg.minutes * 60
    reserve = estimate_sampling_seconds(device, cfg.n_samples, cfg.n_heldout, sampler_steps)
    train_s = deadline - reserve - time.monotonic()
    plan = f"{SMOKE_STEPS} steps per stage" if cfg.smoke else f"{train_s / 60:.1f} min of training in all"
    say(f"relaydiff demo: {data.n_train} training images ({data.n_tiles} tiles + {cfg.n_crops} crops), "
        f"{len(data.heldout_names)} held out; device {device}; {plan}")

    say(f"relaydiff demo: stage 1 (base, {LOW}x{LOW})")
    base_run, base_steps, base_train_s, base_wall = _train_stage("base", data, out / "base", cfg,
                                                                   BASE_SHARE * train_s / 60)
    say(f"relaydiff demo: relay stage ({LOW} -> {TILE})")
    overhead = base_wall - base_train_s          # data decoding and model set-up, as for stage 1
    relay_minutes = (deadline - reserve - time.monotonic() - overhead) / 60
    relay_run, relay_steps, relay_train_s, relay_wall = _train_stage("relay", data, out / "relay", cfg,
                                                                       relay_minutes)
    timings.update(base_s=base_wall, relay_s=relay_wall)

    say("relaydiff demo: sampling")
    t = time.monotonic()
    pipe = RelayPipeline.from_checkpoints(base_run, relay_run, device=device, sampler=SAMPLER, consistency=True)
    disable = True if cfg.quiet else None
    high, low = pipe.sample(cfg.n_samples, seed=cfg.seed, steps=sampler_steps, batch_size=SAMPLE_BATCH,
                            return_low=True, disable=disable)
    high, low = high.cpu(), low.cpu()
    truth = data.heldout
    inputs = F.avg_pool2d(truth, PATCH)
    sr = pipe.super_resolve(inputs.to(device), seed=cfg.seed + 1, steps=None if sampler_steps is None
                            else sampler_steps[1], batch_size=SAMPLE_BATCH, disable=disable).cpu()
    nfe = dict(pipe.last_nfe)
    sr_detail = pipe.super_resolve(inputs.to(device), seed=cfg.seed + 1, steps=DETAIL_LEVELS if sampler_steps
                                   is None else sampler_steps[1], batch_size=SAMPLE_BATCH, disable=disable).cpu()
    nfe["relay_detail"] = pipe.last_nfe["relay"]
    timings["sampling_s"] = time.monotonic() - t

    # quantise like the PNGs the user sees, then score
    q = lambda x: from_uint8(to_uint8(x))  # noqa: E731
    candidates = {"relay": q(sr), "relay_detail": q(sr_detail), "nearest": q(nearest_upsample(inputs, PATCH)),
                  "bicubic": q(F.interpolate(inputs, scale_factor=PATCH, mode="bicubic", align_corners=False)
                               .clamp(-1, 1))}
    scores = superres_scores(candidates, truth)
    metrics = {
        "definition": "PSNR (dB) and SSIM on RGB, images in [-1, 1] (data range 2), uint8-quantised; inputs are "
                      "the ground truth box-downsampled 4x. consistency: PSNR of the output's 4x box-downsample "
                      "against the input. hf_psd: mean |ln PSD ratio| to the ground truth over radial "
                      "frequencies [pi/2, pi] (0 = the truth's high-frequency power). swd: sliced Wasserstein "
                      "distance x 1e3 of every 7x7 Laplacian-pyramid neighbourhood to the ground truth set "
                      f"(16 x 128 directions). relay: the {SAMPLER!r} sampler; relay_detail: the same "
                      f"checkpoint at {DETAIL_LEVELS} levels",
        **{k: {"psnr": float(v["psnr"].mean()), "ssim": float(v["ssim"].mean()),
               "consistency": float(v["consistency"].mean()), "hf_psd": v["hf_psd"], "swd": v["swd"]}
           for k, v in scores.items()},
        "per_tile": [{"name": nm, **{f"{k}_{m}": float(v[m][i]) for k, v in scores.items()
                                     for m in ("psnr", "ssim")}}
                     for i, nm in enumerate(data.heldout_names)],
    }

    (out / "samples" / "low").mkdir(parents=True, exist_ok=True)
    (out / "superres").mkdir(parents=True, exist_ok=True)
    high_u8, low_u8 = to_uint8(high), to_uint8(low)
    for k in range(cfg.n_samples):
        save_png(high_u8[k], out / "samples" / f"{k:06d}.png")
        save_png(low_u8[k], out / "samples" / "low" / f"{k:06d}.png")
    sr_u8 = to_uint8(candidates["relay"])
    detail_u8 = to_uint8(candidates["relay_detail"])
    (out / "superres_detail").mkdir(exist_ok=True)
    for nm, img, img_detail in zip(data.heldout_names, sr_u8, detail_u8):
        save_png(img, out / "superres" / f"{nm}.png")
        save_png(img_detail, out / "superres_detail" / f"{nm}.png")
    per_row = min(4, cfg.n_samples)
    near = to_uint8(nearest_upsample(low, PATCH))
    samples_sheet = _sheet([[_centered(low_u8[k]), near[k], high_u8[k]] for k in range(cfg.n_samples)],
                           [f"stage 1 ({LOW}px)", "nearest x4", f"relay ({TILE}px)"], per_row)
    in_u8, bic_u8, truth_u8 = (to_uint8(x) for x in (candidates["nearest"], candidates["bicubic"], q(truth)))
    rel, bic = scores["relay"], scores["bicubic"]
    sr_sheet = _sheet([[in_u8[i], bic_u8[i], sr_u8[i], detail_u8[i], truth_u8[i]] for i in range(len(sr_u8))],
                      [f"input ({LOW}px)", "bicubic", "relay", f"{DETAIL_LEVELS} levels", "ground truth"],
                      min(2, len(sr_u8)),
                      captions=[f"bicubic {float(bic['psnr'][i]):.1f} dB / {float(bic['ssim'][i]):.2f}    "
                                f"relay {float(rel['psnr'][i]):.1f} dB / {float(rel['ssim'][i]):.2f}"
                                for i in range(len(sr_u8))])
    for name, image in (("samples.png", samples_sheet), ("superres.png", sr_sheet)):
        save_png(np.asarray(image), out / name)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    figures = ["samples.png", "superres.png"]
    if _plot_spectra({"ground truth": q(truth), **{_LABELS.get(k, k): v for k, v in candidates.items()}}, out / "spectrum.png", say):
        figures.append("spectrum.png")

    timings["total_s"] = time.monotonic() - start
    summary = {
        "out": str(out), "device": str(device), "smoke": cfg.smoke, "minutes": cfg.minutes, "seed": cfg.seed,
        "train_images": data.n_train, "train_tiles": data.n_tiles, "heldout": data.heldout_names,
        "base": {"run": str(base_run), "steps": base_steps, "train_s": base_train_s},
        "relay": {"run": str(relay_run), "steps": relay_steps, "train_s": relay_train_s},
        "nfe_per_batch": nfe, "detail_levels": DETAIL_LEVELS, "timings": timings,
        "sampler": SAMPLER, "relay_config": pipe.config.to_dict(),
        "superres": {k: metrics[k] for k in candidates},
        "files": [*figures, "metrics.json", "summary.json", "samples/", "superres/", "superres_detail/",
                  "base/log.jsonl", "relay/log.jsonl", "base/checkpoints/", "relay/checkpoints/",
                  "data/train.zip", "data/heldout/"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _plot_spectra(sets: dict[str, torch.Tensor], path: pathlib.Path, say) -> bool:
    """``spectrum.png``: the radial PSD of each image set (:func:`relaydiff.analysis.radial_psd`,
    32 bins, the bins ``hf_psd`` scores shaded). Needs matplotlib: without it, one notice."""
    from relaydiff.analysis import radial_psd
    try:
        from relaydiff.analysis.plots import plot_spectra
        curves = {name: radial_psd(x, 32) for name, x in sets.items()}
        plot_spectra(curves, str(path), reference="ground truth",
                     title=f"held-out tiles, radial power spectrum ({TILE} px)")
    except ImportError:
        say("relaydiff demo: matplotlib is not installed; spectrum.png skipped (pip install matplotlib)")
        return False
    return True


_LABELS = {"relay_detail": f"relay at {DETAIL_LEVELS} levels"}


def format_summary(s: dict) -> str:
    """The summary ``relaydiff demo`` prints at the end."""
    t = s["timings"]
    lines = [
        f"relaydiff demo: done in {t['total_s'] / 60:.1f} min on {s['device']} "
        f"(data {t['data_s']:.0f} s, stage 1 {t['base_s']:.0f} s / {s['base']['steps']} steps, "
        f"relay {t['relay_s']:.0f} s / {s['relay']['steps']} steps, sampling {t['sampling_s']:.0f} s)",
        f"  {s['out']}/samples.png    {LOW}px stage-1 samples | nearest x4 (relay start) | relay output",
        f"  {s['out']}/superres.png   held-out tiles: {LOW}px input | bicubic | relay output | relay at "
        f"{s['detail_levels']} levels | ground truth",
        *([f"  {s['out']}/spectrum.png   radial power spectra of those and the ground truth"]
          if "spectrum.png" in s["files"] else []),
        f"  {s['out']}/metrics.json, summary.json; samples/, superres/, superres_detail/ (PNGs); base/, relay/ "
        "(log.jsonl, checkpoints); data/",
        "  super-resolution of {} held-out tiles (mean PSNR dB / SSIM / high-frequency |ln PSD ratio| / SWD): "
        "{}".format(len(s["heldout"]), ", ".join(f"{_LABELS.get(k, k)} {v['psnr']:.2f} / {v['ssim']:.3f} / {v['hf_psd']:.2f} / "
                                                 f"{v['swd']:.0f}" for k, v in s["superres"].items())),
    ]
    return "\n".join(lines)
