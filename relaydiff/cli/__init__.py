"""The ``relaydiff`` command line: ``relaydiff <subcommand> --help``.

Each subcommand lives in its own module of this package with two functions:
``add_parser(subparsers)`` (returns its argparse parser) and ``run(args) -> int``.
Errors a user can fix raise :class:`CLIError`: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .common import CLIError, one_line

# (module, one-line help) in the order `relaydiff --help` lists them
SUBCOMMANDS: list[tuple[str, str]] = [
    ("demo", "train and sample a tiny relay cascade on bundled photos (~10 min, CPU)"),
    ("study", "relay vs scratch vs CDM, block vs white noise: equal budgets per arm, seeds, table"),
    ("train", "train a base (stage 1) or relay (stage 2) model from a folder of images"),
    ("sample", "generate images with a stage-1 and a relay model"),
    ("upscale", "super-resolve a folder of images with a relay model"),
    ("eval", "FID/sFID/IS/precision-recall/SWD/PSNR/SSIM of generated images"),
    ("analyze", "PSD/SNR frequency analysis of images under white and block noise"),
    ("convert", "convert a released EDM .pkl / RDM .pt checkpoint to .safetensors"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relaydiff", description="Relay Diffusion: train, sample, evaluate and analyse relay models.")
    from relaydiff import __version__
    parser.add_argument("--version", action="version", version=f"relaydiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for module, _ in SUBCOMMANDS:
        mod = importlib.import_module(f"relaydiff.cli.{module}")
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    from relaydiff.images import ImageError
    try:
        return int(args._run(args) or 0)
    except (CLIError, ImageError) as e:   # an unusable image file is the user's to fix wherever it is read
        print(f"relaydiff {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"relaydiff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
