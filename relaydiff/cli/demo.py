"""``relaydiff demo``: train a tiny relay cascade on the photos bundled with scikit-image and
scikit-learn, then sample and super-resolve with it. Needs no arguments and no download.

    relaydiff demo                      # about 14 minutes on 2 CPU cores, writes demo_out/
    relaydiff demo --minutes 30 --out big_demo/
    relaydiff demo --smoke              # seconds: 2 training steps per stage (CI)

Writes samples.png (16 px stage-1 samples | their nearest upsample, where the relay stage
starts | the 64 px relay outputs), superres.png (held-out real tiles: 16 px input | bicubic |
relay output | ground truth, with PSNR/SSIM), metrics.json (also the high-frequency spectrum
error, SWD and consistency), summary.json, the PNGs under
samples/ and superres/, and the two training runs (base/, relay/: log.jsonl, checkpoints;
usable with `relaydiff sample` and `relaydiff upscale`). See docs/demo.md.
"""
from __future__ import annotations

import argparse

from .common import CLIError, pick_device
from .sample import parse_float, parse_int


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="train and sample a tiny relay cascade on bundled photos (~14 min, CPU)",
                              description="Train a tiny 16 -> 64 relay cascade on the real photos bundled "
                                          "with scikit-image and scikit-learn, then sample and super-resolve.",
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", metavar="DIR",
                   help="output folder; must not exist or be empty (default demo_out)")
    p.add_argument("--minutes", default="14", metavar="M",
                   help="wall-clock budget for the whole demo, data to figures (default 14)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: 24 tiles + 8 crops, 2 optimizer steps per stage, short sampler grids "
                   "(ignores --minutes; for CI)")
    p.add_argument("--seed", default="0", help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars; print only the summary")
    return p


def run(args) -> int:
    from relaydiff.demo import DemoConfig, DemoError, format_summary, run_demo

    minutes = parse_float(args.minutes, "--minutes")
    if minutes == 0:
        raise CLIError(f"--minutes must be positive; got {args.minutes!r}")
    seed = parse_int(args.seed, "--seed", low=0)
    device = pick_device(args.device)
    cfg = DemoConfig(out=args.out, minutes=minutes, smoke=args.smoke, seed=seed, device=str(device),
                     quiet=args.quiet)
    try:
        summary = run_demo(cfg)
    except DemoError as e:
        raise CLIError(str(e)) from None
    print(format_summary(summary))
    return 0
