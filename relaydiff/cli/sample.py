"""``relaydiff sample``: generate images with a stage-1 and a relay checkpoint.

    relaydiff sample --stage1 RUN1 --stage2 RUN2 --out samples/ --n 16 --grid

writes ``samples/{seed:06d}.png`` for the image seeds ``--seed .. --seed + n - 1`` (the
images of a batch share its noise draws, so an image is reproduced by the same ``--seed``,
``--n`` and ``--batch``; ``--seeds 0-63`` or ``--seeds 1,5,8-9`` instead makes image ``s``
from seed ``s`` alone, whatever the batch, as EDM's generate.py does), plus ``grid.png``
with ``--grid`` and the stage-1 images under ``low/`` with ``--save-low``, and
``relaydiff-sample.json`` naming the samples (so that ``relaydiff eval --images OUT`` reads
only those). ``--out`` must be new or empty. Images are written batch by batch as they
finish, so any number fits in memory; a run that stopped (killed, out of time) continues
with the same command plus ``--resume``, bit-identically. The disk space the images can
take (uncompressed PNG bound) is checked before anything is sampled.
``--stage2`` takes several relay checkpoints for a cascade.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

from .common import CLIError, new_folder, pick_device

SEED_MOD = "seed-mod"   # --class seed-mod: the authors' labels, class = seed % label_dim
RANDOM = "random"       # --class random: classes drawn from the seed, whatever the preset's label mode


def parse_int(value: str, flag: str, low: int = 1) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = None
    if v is None or v < low:
        raise CLIError(f"{flag} must be an integer >= {low}; got {value!r}")
    return v


def parse_float(value: str | None, flag: str, low: float = 0.0, high: float = float("inf")) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not low <= v < high:
        raise CLIError(f"{flag} must be a number in [{low}, {high}); got {value!r}")
    return v


def parse_steps(value: str | None) -> tuple[int | None, int | None]:
    """``"N"`` (both stages) or ``"N1,N2"`` (stage 1, relay) -> a pair; None -> (None, None)."""
    if value is None:
        return None, None
    parts = value.split(",")
    if len(parts) not in (1, 2):
        raise CLIError(f"--steps must be N or N1,N2; got {value!r}")
    nums = [parse_int(p, "--steps") for p in parts]
    return (nums[0], nums[-1])


def add_sampler_args(p) -> None:
    """The sampler and loading flags shared by ``sample`` and ``upscale``."""
    from relaydiff.images import AUTHORS_ENHANCE
    from relaydiff.sampling import PRESETS
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="sampler settings (imagenet256/celebahq256: the published ones); default: default")
    p.add_argument("--cfg", metavar="W", help="classifier-free guidance scale of the relay stage (1: off)")
    p.add_argument("--s-noise", metavar="S", dest="s_noise",
                   help="relay sampler stochasticity in [0, 1) (the preset's by default, 0.2)")
    p.add_argument("--correction", choices=["slope", "denoised"],
                   help="what the relay sampler's Heun step averages: slope (the paper) or denoised (keeps the "
                        "forward marginal when the blur changes much within a step; default: the preset's)")
    p.add_argument("--fresh-correction-noise", action=argparse.BooleanOptionalAction, dest="fresh_noise",
                   help="new noise in the relay sampler's Heun correction (the authors' code) instead of the "
                        "Euler step's (the paper; default: the preset's)")
    p.add_argument("--heun-last-level", action=argparse.BooleanOptionalAction, dest="heun_last_level",
                   help="Heun-correct the relay step into the last nonzero level (paper Algorithm 1, the "
                        "authors' code; --no-heun-last-level: Euler there; default: the preset's)")
    p.add_argument("--relay-churn", metavar="S[,MIN,MAX,NOISE]", dest="relay_churn",
                   help="churn inside the relay sampler as in the authors' CelebA-HQ code: S_churn, and "
                        "optionally S_min, S_max, S_noise (default: the preset's, off)")
    p.add_argument("--post", choices=["authors-enhance", *sorted(AUTHORS_ENHANCE)],
                   help="save the images as the authors' scripts did before their published FIDs: their uint8 "
                        "conversion floor(127.5 x + 128) and their img_enhance (authors-enhance: the one of the "
                        "--preset authors-*); off by default")
    p.add_argument("--consistency", action="store_true",
                   help="keep the low-resolution image's patch means: the output box-downsamples to it")
    p.add_argument("--class", metavar="K", dest="class_idx", help="class index for every image, seed-mod "
                   "with --seeds: the image of seed s gets class s %% classes, as the authors' scripts, or random: "
                   "classes drawn from the seed (class-conditional models; default: the preset's, random except "
                   "seed-mod with --preset authors-* and --seeds)")
    p.add_argument("--seed", help="base random seed (default 0)")
    p.add_argument("--batch", default="16", help="images per batch (default 16)")
    p.add_argument("--which", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def checkpoint_path(path: str, flag: str) -> str:
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path!r} does not exist")
    return path


def sampler_preset(args):
    """The chosen preset with ``--cfg``/``--s-noise`` (and ``--cfg1`` where the command has it) applied,
    and ``--class random`` / ``seed-mod`` as its label mode."""
    from relaydiff.sampling import get_preset
    preset = get_preset(args.preset)
    if getattr(args, "class_idx", None) in (RANDOM, SEED_MOD):
        preset = dataclasses.replace(preset, labels=args.class_idx)
    stage1 = {}
    cfg1 = parse_float(getattr(args, "cfg1", None), "--cfg1")
    if cfg1 is not None:
        stage1["cfg"] = cfg1
    sde = parse_float(getattr(args, "sde_scale", None), "--sde-scale", high=1.0)
    if sde is not None:
        stage1["sde_scale"] = sde
    preset = dataclasses.replace(preset, stage1=dataclasses.replace(preset.stage1, **stage1))
    relay = {}
    cfg = parse_float(args.cfg, "--cfg")
    if cfg is not None:
        relay["cfg"] = cfg
    s_noise = parse_float(args.s_noise, "--s-noise", high=1.0)
    if s_noise is not None:
        relay["s_noise"] = s_noise
    if getattr(args, "correction", None) is not None:
        relay["correction"] = args.correction
    if getattr(args, "fresh_noise", None) is not None:
        relay["fresh_correction_noise"] = args.fresh_noise
    if getattr(args, "heun_last_level", None) is not None:
        relay["heun_last_level"] = args.heun_last_level
    if getattr(args, "relay_churn", None) is not None:
        parts = args.relay_churn.split(",")
        if len(parts) not in (1, 4):
            raise CLIError(f"--relay-churn must be S or S,MIN,MAX,NOISE; got {args.relay_churn!r}")
        names = ("churn", "churn_min", "churn_max", "churn_noise")
        for name, part in zip(names, parts):
            inf = name == "churn_max" and part.strip().lower() == "inf"   # EDM's S_max default
            relay[name] = float("inf") if inf else parse_float(part, "--relay-churn")
    return dataclasses.replace(preset, relay=dataclasses.replace(preset.relay, **relay))


def post_process(args):
    """``--post`` -> the function that makes the saved images. Given the generated floats
    ``[B, C, H, W]`` in [-1, 1] it returns ``[B, H, W, C]`` uint8: ``to_uint8`` without ``--post``;
    with ``--post authors-*`` the authors' ``save_samples`` (their conversion ``floor(127.5 x +
    128)``, then their enhancement; ``relaydiff.images.authors_postprocess``). Given images that
    are already uint8 ``[B, H, W, C]`` it applies only the enhancement (identity without ``--post``)."""
    import numpy as np

    from relaydiff.images import authors_enhance, authors_postprocess, to_uint8
    name = getattr(args, "post", None)
    if name == "authors-enhance":
        name = "authors-enhance-" + args.preset.removeprefix("authors-")
        if not args.preset.startswith("authors-"):
            raise CLIError("--post authors-enhance needs --preset authors-imagenet256 or authors-celebahq256 "
                           "(or name the enhancement: --post authors-enhance-imagenet256, ...)")

    def post(images):
        if isinstance(images, np.ndarray):
            return images if name is None else authors_enhance(images, name)
        return to_uint8(images) if name is None else authors_postprocess(images, name)
    return post


def parse_seeds(value: str) -> list[int]:
    """``--seeds``: comma-separated seeds and inclusive ranges (``1,2,5-10``), EDM's syntax."""
    seeds = []
    for part in value.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            a = b = -1
        if a < 0 or b < a or not lo.strip().isdigit():
            raise CLIError(f"--seeds must be seeds and ranges such as 0-63 or 1,5,8-9 (seeds >= 0); got {value!r}")
        seeds.extend(range(a, b + 1))
    if len(set(seeds)) != len(seeds):
        raise CLIError(f"--seeds names a seed twice; got {value!r}")
    return seeds


def load_pipeline(stage1: str | None, stage2: list[str], args):
    """``RelayPipeline.from_checkpoints`` with load failures turned into one-line errors."""
    from relaydiff.pipeline import PipelineError, RelayPipeline
    device = pick_device(args.device)
    try:
        return RelayPipeline.from_checkpoints(stage1, *stage2, which=args.which, device=device,
                                              sampler=sampler_preset(args),
                                              consistency=bool(getattr(args, "consistency", False)))
    except PipelineError as e:
        raise CLIError(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        # a malformed file's metadata can fail with any of these; none of them is a relaydiff bug
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        files = [f for f in (stage1, *stage2) if f is not None]
        if not any(f in first for f in files):
            first = f"{first} (loading {', '.join(files)})"
        raise CLIError(f"cannot load the checkpoints: {first}") from None


def class_labels(args, pipe, n: int):
    if args.class_idx is None:
        return None
    if pipe.label_dim == 0:
        raise CLIError("--class given, but the models are unconditional")
    k = parse_int(args.class_idx, "--class", low=0)
    if k >= pipe.label_dim:
        raise CLIError(f"--class must be in [0, {pipe.label_dim}); got {k}")
    return [k] * n


def class_labels_for(args, pipe, n: int, seeds: list[int] | None):
    """The labels of ``--class``: ``K`` for every image, ``seed-mod`` (the authors' generate
    scripts: the image of seed ``s`` gets class ``s % label_dim``, needs ``--seeds``;
    :func:`relaydiff.sampling.authors_class_labels`), ``random`` or none (``None``: the pipeline's
    preset decides, :class:`relaydiff.sampling.SamplerPreset` ``labels``; :func:`sampler_preset`
    sets it for ``random``). ``pipe=None`` only checks the flags, before anything is loaded."""
    if args.class_idx == RANDOM:
        if pipe is not None and pipe.label_dim == 0:
            raise CLIError("--class given, but the models are unconditional")
        return None
    if args.class_idx != SEED_MOD:
        return None if pipe is None else class_labels(args, pipe, n)
    if seeds is None:
        raise CLIError("--class seed-mod gives the image of seed s the class s % (number of classes), "
                       "as the authors' scripts; it needs --seeds")
    if pipe is None:
        return None
    if pipe.label_dim == 0:
        raise CLIError("--class given, but the models are unconditional")
    from relaydiff.sampling import authors_class_labels
    return authors_class_labels(seeds, pipe.label_dim)


def add_parser(subparsers):
    p = subparsers.add_parser("sample", help="generate images with a stage-1 and a relay model",
                              description="Generate images with a stage-1 and a relay model.",
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1", required=True, metavar="CKPT",
                   help="stage-1 (base) run directory or checkpoint file")
    p.add_argument("--stage2", required=True, nargs="+", metavar="CKPT",
                   help="relay run directory or checkpoint file (several: a cascade, lowest first)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder; must not exist or be empty")
    p.add_argument("--n", help="number of images (default 16)")
    p.add_argument("--seeds", metavar="LIST", help="one seed per image, e.g. 0-63 or 1,5,8-9: image s depends "
                   "on seed s alone (EDM's convention); replaces --seed and --n")
    p.add_argument("--steps", metavar="N[,N2]",
                   help="grid size of both stages, or stage 1 and relay (relay: before truncation)")
    p.add_argument("--cfg1", metavar="W", help="classifier-free guidance scale of stage 1 (1: off)")
    p.add_argument("--sde-scale", metavar="C", dest="sde_scale",
                   help="stage-1 SDE sampler of the authors' CelebA-HQ script: share C in [0, 1) of fresh noise "
                        "per step (their 0.05; default: the preset's, 0 = EDM's Heun)")
    p.add_argument("--grid", action="store_true", help=f"also write grid.png (the first {GRID_MAX} images)")
    p.add_argument("--resume", action="store_true",
                   help="continue an unfinished run in --out (same flags): the batches already written are kept")
    p.add_argument("--no-space-check", action="store_true", dest="no_space_check",
                   help="skip the upfront check that the images fit on the disk")
    p.add_argument("--save-low", action="store_true", dest="save_low",
                   help="also write the images the last relay stage started from, under low/")
    add_sampler_args(p)
    return p


GRID_MAX = 64   # images in grid.png
# flags that do not change the images (a resumed run may change them)
_NOT_SETTINGS = {"out", "resume", "quiet", "no_space_check", "grid", "device", "command", "_run"}


def _fingerprint(path: str) -> dict:
    """Which weights a checkpoint argument names and their size and time, so that ``--resume``
    notices a run directory that has moved on to a newer checkpoint."""
    from relaydiff.models.checkpoint import read_latest
    target = os.path.abspath(path)
    try:
        if os.path.isdir(target) and os.path.isfile(os.path.join(target, "checkpoints", "latest")):
            target = str(read_latest(os.path.join(target, "checkpoints")))
        st = os.stat(target)
    except (OSError, ValueError):
        return {"path": target}
    return {"path": target, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _settings(args, device) -> dict:
    """Everything the images depend on: the flags (minus output-only ones), the checkpoints'
    identity and the device type."""
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS and not callable(v)}
    return {"flags": flags, "stage1": _fingerprint(args.stage1), "stage2": [_fingerprint(s) for s in args.stage2],
            "device": device.type}


def _png_bound(c: int, h: int, w: int) -> int:
    """Bytes an ``h x w x c`` uint8 PNG takes at most on disk: raw rows with their filter byte,
    deflate's worst-case growth, headers, and one file-system block of slack."""
    raw = h * (w * c + 1)
    return raw + raw // 1000 + 1024 + 4096


def _check_space(path: str, need: int, n: int) -> None:
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise CLIError(f"--out {path!r}: {n} images can take up to {need / 1e9:.2f} GB (uncompressed PNG bound), "
                       f"and {parent!r} has {free / 1e9:.2f} GB free; lower --n or pass --no-space-check")


def _unfinished(out: str, settings: dict) -> dict:
    """The manifest of the unfinished run ``--resume`` continues, checked against ``settings``."""
    from relaydiff.images import SAMPLE_MANIFEST
    path = os.path.join(out, SAMPLE_MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            raise ValueError
    except FileNotFoundError:
        raise CLIError(f"--resume: {out!r} holds no relaydiff sample run ({SAMPLE_MANIFEST} is missing)") from None
    except (OSError, ValueError, RecursionError):
        raise CLIError(f"--resume: {path!r} is not a relaydiff sample manifest") from None
    old = manifest.get("settings")
    if old != settings:
        if not isinstance(old, dict):
            raise CLIError(f"--resume: {path!r} records no settings to continue from")
        changed = sorted({k for k in (*old.get("flags", {}), *settings["flags"])
                          if old.get("flags", {}).get(k) != settings["flags"].get(k)}
                         | {k for k in ("stage1", "stage2", "device") if old.get(k) != settings[k]})
        raise CLIError(f"--resume: the run in {out!r} was made with other settings ({', '.join(changed)} differ); "
                       f"repeat its command exactly")
    return manifest


def run(args) -> int:
    from relaydiff.images import (SAMPLE_MANIFEST, from_uint8, image_grid, read_image, save_png, to_uint8,
                                  write_sample_manifest)

    if args.seeds is not None and (args.n is not None or args.seed is not None):
        raise CLIError("--seeds gives every image its seed; it replaces --seed and --n")
    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    class_labels_for(args, None, 0, seeds)   # --class seed-mod without --seeds: refused before anything is written
    n = len(seeds) if seeds is not None else parse_int(args.n or "16", "--n")
    batch = parse_int(args.batch, "--batch")
    seed = parse_int(args.seed or "0", "--seed", low=0)
    names = [f"{s:06d}.png" for s in (seeds if seeds is not None else range(seed, seed + n))]
    steps = parse_steps(args.steps)
    sampler_preset(args)  # flag errors before anything is loaded
    post = post_process(args)
    stage1 = checkpoint_path(args.stage1, "--stage1")
    stage2 = [checkpoint_path(s, "--stage2") for s in args.stage2]
    settings = _settings(args, pick_device(args.device))
    out = args.out
    if args.resume:
        manifest = _unfinished(out, settings)
        if manifest.get("complete", True):
            if not args.quiet:
                print(f"{out}: the run is complete ({len(names)} images); nothing to do")
            return 0
    elif os.path.isfile(os.path.join(out, SAMPLE_MANIFEST)) and not _complete(out):
        raise CLIError(f"--out {out!r} holds an unfinished run; add --resume to continue it, or choose a new folder")
    else:
        new_folder(out, "--out")
    pipe = load_pipeline(stage1, stage2, args)
    labels = class_labels_for(args, pipe, n, seeds)
    c, h, w = pipe.out_shape
    p = pipe.config.patch_size
    need = n * (_png_bound(c, h, w) + (_png_bound(c, h // p, w // p) if args.save_low else 0)) + 32 * n
    if not args.no_space_check and not args.resume:
        _check_space(out, need, n)

    low_dir = os.path.join(out, "low")
    extras = dict(grid="grid.png" if args.grid else None, low="low" if args.save_low else None)
    os.makedirs(low_dir if args.save_low else out, exist_ok=True)
    # the batches already on disk (save_png writes a file whole or not at all, batches in order)
    start = 0
    if args.resume:
        def done(name):
            return os.path.isfile(os.path.join(out, name)) and (
                not args.save_low or os.path.isfile(os.path.join(low_dir, name)))
        while start < n and all(done(name) for name in names[start:start + batch]):
            start += batch
    else:
        write_sample_manifest(out, names, complete=False, settings=settings, **extras)
    batches = () if start >= n else pipe.iter_sample(
        n, labels, steps=steps, seed=None if seeds else seed, seeds=seeds, batch_size=batch, start=start,
        disable=True if args.quiet else None)
    try:
        for j, high, low in batches:
            for name, img in zip(names[j:], post(high)):
                save_png(img, os.path.join(out, name))
            if args.save_low:
                for name, img in zip(names[j:], to_uint8(low)):
                    save_png(img, os.path.join(low_dir, name))
    except KeyboardInterrupt:
        print("relaydiff sample: the batches written so far are kept; the same command with --resume "
              "continues the run", file=sys.stderr)
        raise
    if args.grid:   # from the saved files: a resumed run's first batches are on disk only
        import numpy as np
        first = np.stack([read_image(os.path.join(out, name), os.path.join(out, name), channels=c)
                          for name in names[:GRID_MAX]])
        save_png(image_grid(from_uint8(first)), os.path.join(out, "grid.png"))
    # which files are the samples: `relaydiff eval --images OUT` reads only these, not grid.png or low/
    write_sample_manifest(out, names, complete=True, settings=settings, **extras)
    if not args.quiet:
        nfe = ", ".join(f"{k} {v}" for k, v in pipe.last_nfe.items())
        resumed = f" ({start} were already there)" if start else ""
        print(f"wrote {n} images of {w}px to {out}{resumed} (NFE per batch: {nfe or 'none run'})")
    return 0


def _complete(out: str) -> bool:
    from relaydiff.images import SAMPLE_MANIFEST
    try:
        with open(os.path.join(out, SAMPLE_MANIFEST)) as f:
            return bool(json.load(f).get("complete", True))
    except (OSError, ValueError, AttributeError, RecursionError):
        return True
