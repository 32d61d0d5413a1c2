"""``relaydiff sample``: generate images with a stage-1 and a relay checkpoint.

    relaydiff sample --stage1 RUN1 --stage2 RUN2 --out samples/ --n 16 --grid

writes ``samples/{seed:06d}.png`` for the image seeds ``--seed .. --seed + n - 1`` (the
images of a batch share its noise draws, so an image is reproduced by the same ``--seed``,
``--n`` and ``--batch``; ``--seeds 0-63`` or ``--seeds 1,5,8-9`` instead makes image ``s``
from seed ``s`` alone, whatever the batch, as EDM's generate.py does), plus ``grid.png``
with ``--grid`` and the stage-1 images under ``low/`` with ``--save-low``, and
``relaydiff-sample.json`` naming the samples (so that ``relaydiff eval --images OUT`` reads
only those). ``--out`` must be new or empty.
``--stage2`` takes several relay checkpoints for a cascade.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from .common import CLIError, new_folder, pick_device


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
                   help="post-process the saved images as the authors' scripts did before their published "
                        "FIDs (authors-enhance: the one of the --preset authors-*); off by default")
    p.add_argument("--consistency", action="store_true",
                   help="keep the low-resolution image's patch means: the output box-downsamples to it")
    p.add_argument("--class", metavar="K", dest="class_idx", help="class index for every image "
                   "(class-conditional models; default: random classes from the seed)")
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
    """The chosen preset with ``--cfg``/``--s-noise`` (and ``--cfg1`` where the command has it) applied."""
    from relaydiff.sampling import get_preset
    preset = get_preset(args.preset)
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
    """``--post`` -> a function of ``[B, H, W, C]`` uint8 images (identity without it)."""
    from relaydiff.images import authors_enhance
    name = getattr(args, "post", None)
    if name is None:
        return lambda images: images
    if name == "authors-enhance":
        name = "authors-enhance-" + args.preset.removeprefix("authors-")
        if not args.preset.startswith("authors-"):
            raise CLIError("--post authors-enhance needs --preset authors-imagenet256 or authors-celebahq256 "
                           "(or name the enhancement: --post authors-enhance-imagenet256, ...)")
    return lambda images: authors_enhance(images, name)


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
    p.add_argument("--grid", action="store_true", help="also write grid.png")
    p.add_argument("--save-low", action="store_true", dest="save_low",
                   help="also write the images the last relay stage started from, under low/")
    add_sampler_args(p)
    return p


def run(args) -> int:
    from relaydiff.images import image_grid, save_png, to_uint8, write_sample_manifest

    if args.seeds is not None and (args.n is not None or args.seed is not None):
        raise CLIError("--seeds gives every image its seed; it replaces --seed and --n")
    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    n = len(seeds) if seeds is not None else parse_int(args.n or "16", "--n")
    batch = parse_int(args.batch, "--batch")
    seed = parse_int(args.seed or "0", "--seed", low=0)
    names = [f"{s:06d}.png" for s in (seeds if seeds is not None else range(seed, seed + n))]
    steps = parse_steps(args.steps)
    sampler_preset(args)  # flag errors before anything is loaded
    post = post_process(args)
    stage1 = checkpoint_path(args.stage1, "--stage1")
    stage2 = [checkpoint_path(s, "--stage2") for s in args.stage2]
    new_folder(args.out, "--out")
    pipe = load_pipeline(stage1, stage2, args)
    labels = class_labels(args, pipe, n)

    high, low = pipe.sample(n, labels, steps=steps, seed=None if seeds else seed, seeds=seeds, batch_size=batch,
                            return_low=True, disable=True if args.quiet else None)
    os.makedirs(args.out, exist_ok=True)
    for name, img in zip(names, post(to_uint8(high))):
        save_png(img, os.path.join(args.out, name))
    if args.save_low:
        os.makedirs(os.path.join(args.out, "low"), exist_ok=True)
        for name, img in zip(names, to_uint8(low)):
            save_png(img, os.path.join(args.out, "low", name))
    if args.grid:
        save_png(image_grid(high), os.path.join(args.out, "grid.png"))
    # which files are the samples: `relaydiff eval --images OUT` reads only these, not grid.png or low/
    write_sample_manifest(args.out, names,
                          grid="grid.png" if args.grid else None, low="low" if args.save_low else None)
    if not args.quiet:
        nfe = ", ".join(f"{k} {v}" for k, v in pipe.last_nfe.items())
        print(f"wrote {n} images of {high.shape[-1]}px to {args.out} (NFE per batch: {nfe})")
    return 0
