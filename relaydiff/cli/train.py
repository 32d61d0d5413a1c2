"""``relaydiff train``: train the base stage or the relay stage of a cascade."""
from __future__ import annotations

import argparse
import dataclasses

from .common import CLIError, add_image_limit, apply_image_limit, check_device

_TRI = {"auto": None, "yes": True, "no": False}

EPILOG = """examples:
  relaydiff train --stage base  --data faces/ --out runs/base  --preset small --steps 20000
  relaydiff train --stage relay --data faces/ --out runs/relay --preset small --steps 20000
  relaydiff train --stage relay --data faces/ --out runs/relay --preset small --steps 40000 --resume
  torchrun --nproc_per_node=8 -m relaydiff.cli train --stage relay --preset imagenet256-relay \\
      --data imagenet.zip --out runs/in256 --kimg 1000000 --amp bfloat16

The relay stage trains on the high-resolution images only (the low-resolution condition is
the blurred image itself). Options left out take the preset's value; presets:
relaydiff.models.PRESETS. Bad options or data end with one line on stderr, exit status 2,
and nothing written."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from relaydiff.models import PRESETS
    p = subparsers.add_parser(
        "train", help="train a base (stage 1) or relay (stage 2) model from a folder of images",
        description="Train one stage of a relay diffusion cascade (EDM-preconditioned ADM U-Net) "
                    "from a folder or zip of PNG/JPEG images, on CPU, one GPU, or many with torchrun.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--stage", required=True, help="'base' (stage 1: plain EDM at low resolution) or "
                   "'relay' (stage 2: blurring + block noise at high resolution)")
    g.add_argument("--data", required=True, help="folder (searched recursively) or .zip of PNG/JPEG images; "
                   "top-level sub-folders are classes")
    g.add_argument("--out", required=True, help="run directory for checkpoints/, samples/, log.jsonl")
    g.add_argument("--preset", default="tiny",
                   help=f"model and hyper-parameter preset (default tiny): {', '.join(PRESETS)}")
    g.add_argument("--resolution", type=int, help="training resolution in px; for the relay stage the high "
                   "resolution (default: the preset's; relay with tiny/small: 16 x patch size)")
    g.add_argument("--crop", type=int, help="train on random crops of this size in px (convolutional "
                   "presets; sampling still runs at --resolution; default: the preset's, e.g. tiny-relay: 32)")
    g.add_argument("--labels", choices=list(_TRI), default="auto",
                   help="class labels from top-level sub-folders: auto (when there are >= 2 and every image "
                   "is inside one), yes, no (default auto)")

    g = p.add_argument_group("how long")
    g.add_argument("--steps", type=int, help="optimizer steps in total")
    g.add_argument("--kimg", type=float, help="thousands of training images in total (instead of --steps)")
    g.add_argument("--minutes", type=float, help="wall-clock budget for this invocation: checkpoint and stop "
                   "when spent (combine with --resume to continue later)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, help="images per optimizer step over all processes (default: preset's)")
    g.add_argument("--accum", type=int, default=1, help="gradient-accumulation rounds per step (default 1)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default: preset's)")
    g.add_argument("--warmup-kimg", type=float, help="linear learning-rate warm-up in thousands of images")
    g.add_argument("--ema-kimg", type=float, dest="ema_halflife_kimg", help="EMA half-life, thousands of images")
    g.add_argument("--ema-rampup", type=float, default=0.05,
                   help="cap the EMA half-life at this fraction of the images seen (default 0.05; 0: off)")
    g.add_argument("--grad-clip", type=float, help="clip the global gradient norm (default: off)")
    g.add_argument("--dropout", type=float, help="U-Net dropout (default: preset's)")
    g.add_argument("--label-dropout", type=float,
                   help="probability of dropping the class label, for classifier-free guidance (default: preset's)")
    g.add_argument("--no-xflip", action="store_true", help="no random horizontal flips")
    g.add_argument("--augment", type=float, metavar="P",
                   help="geometric augmentation probability per transform, with labels to the network "
                        "(paper: 0.2 on CelebA-HQ; default: preset's, 0 = off; docs/training.md)")
    g.add_argument("--amp", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="network precision: bfloat16/float16 autocast (float16 with loss scaling); default float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute U-Net block activations in the backward pass (about a third of the "
                   "memory, 1.5-1.8x the step time on an H100)")
    g.add_argument("--seed", type=int, default=0, help="random seed: weights, data order, noise (default 0)")

    g = p.add_argument_group("base stage noise (paper App. C.2; saved in the checkpoint, so sample uses it too)")
    g.add_argument("--block-noise", type=float, default=0.0, metavar="ALPHA",
                   help="train with mixed noise (e + ALPHA Block_s(e2)) / sqrt(1 + ALPHA^2) instead of white "
                   "noise (paper: 0.15; default 0 = white)")
    g.add_argument("--block-noise-size", type=int, metavar="S",
                   help="s: the block size of --block-noise, in [1, 16] (default 4)")

    g = p.add_argument_group("relay stage (default: the preset's published settings, else RelayConfig())")
    g.add_argument("--patch-size", type=int, help="p: blur patch = relay up-scaling factor (2, 4, 8, 16)")
    g.add_argument("--alpha", type=float, help="weight of block noise in the mixed noise")
    g.add_argument("--block-size", type=int, help="s: block-noise kernel size")
    g.add_argument("--truncation", type=float, help="T: the truncation of the sigma schedule, in (0, 1]")
    g.add_argument("--blur-sigma-max", type=float, help="sigma_B at t = 1")
    g.add_argument("--min-scale", type=float, help="floor m of the blur factors")
    g.add_argument("--p-mean", type=float, help="log-normal noise schedule mean")
    g.add_argument("--p-std", type=float, help="log-normal noise schedule std")
    g.add_argument("--sigma-floor", type=float, help="smallest training sigma")
    g.add_argument("--normalize-noise", choices=["yes", "no"],
                   help="divide mixed noise by sqrt(1 + alpha^2) (no: the authors' code variant)")
    g.add_argument("--blur", choices=["dct", "linear"],
                   help="dct: the paper's patch-DCT blur (default); linear: CogView3's linear blur towards "
                   "the patch mean (--blur-sigma-max unused; --min-scale 0 for CogView3 exactly)")

    g = p.add_argument_group("running")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default; under torchrun "
                   "each process takes cuda:LOCAL_RANK)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default: 0 for data cached in "
                   "memory, else 4)")
    g.add_argument("--cache", choices=list(_TRI), default="auto",
                   help="keep decoded images in memory: auto (when <= 256 MiB), yes, no")
    g.add_argument("--log-every", type=int, default=50, help="steps between log.jsonl lines (default 50)")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default 1000; "
                   "one is always written at the end)")
    g.add_argument("--checkpoint-minutes", type=float, metavar="M",
                   help="also checkpoint whenever M minutes of wall clock passed since the last one")
    g.add_argument("--sample-every", type=int, default=1000, help="steps between sample grids in samples/ "
                   "(default 1000; 0: only at the end; -1: never)")
    g.add_argument("--sample-count", type=int, default=16, help="images per sample grid (default 16)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3; 0: all)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_image_limit(g)
    return p


def _relay_config(args, preset):
    from relaydiff.config import RelayConfig
    # each relay flag's dest is the RelayConfig field of the same name
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(RelayConfig)
                 if getattr(args, f.name) is not None}
    if "normalize_noise" in overrides:
        overrides["normalize_noise"] = overrides["normalize_noise"] == "yes"
    if args.stage != "relay":
        if overrides:
            raise CLIError(f"relay options (--{next(iter(overrides)).replace('_', '-')}) apply only to --stage relay")
        return None
    base = preset.relay or RelayConfig()
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as e:
        raise CLIError(str(e)) from None


def build_config(args):
    """The :class:`~relaydiff.training.TrainConfig` for parsed ``args`` (validated)."""
    from relaydiff.models import PRESETS
    from relaydiff.training import ConfigError, TrainConfig
    if args.stage not in ("base", "relay"):
        raise CLIError(f"--stage must be 'base' or 'relay'; got {args.stage!r}")
    if args.preset not in PRESETS:
        raise CLIError(f"--preset: unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    check_device(args.device)
    noise = {}
    if args.block_noise_size is not None:
        if args.stage != "base":
            raise CLIError("--block-noise-size applies only to --stage base (the relay stage's is --block-size)")
        noise["block_noise_size"] = args.block_noise_size
    cfg = TrainConfig(
        stage=args.stage, data=args.data, out=args.out, preset=args.preset, resolution=args.resolution,
        crop=args.crop,
        batch=args.batch, accum=args.accum, steps=args.steps, kimg=args.kimg, lr=args.lr,
        warmup_kimg=args.warmup_kimg, ema_halflife_kimg=args.ema_halflife_kimg,
        ema_rampup=args.ema_rampup or None, grad_clip=args.grad_clip, dropout=args.dropout,
        label_dropout=args.label_dropout, labels=_TRI[args.labels], xflip=not args.no_xflip,
        augment=args.augment, amp=args.amp,
        compile=args.compile, grad_checkpointing=args.grad_checkpointing, minutes=args.minutes, seed=args.seed,
        device=args.device, resume=args.resume, quiet=args.quiet, relay=_relay_config(args, PRESETS[args.preset]),
        workers=args.workers, cache=_TRI[args.cache], log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes, sample_every=args.sample_every, sample_count=args.sample_count,
        keep=args.keep, block_noise=args.block_noise, **noise)
    try:
        cfg.resolved()
    except ConfigError as e:
        raise CLIError(str(e)) from None
    return cfg


def run(args) -> int:
    from relaydiff.training import ConfigError, train
    cfg = build_config(args)
    apply_image_limit(args)
    try:
        out = train(cfg)
    except ConfigError as e:
        raise CLIError(str(e)) from None
    if not args.quiet:
        print(f"relaydiff train: run directory {out}")
    return 0
