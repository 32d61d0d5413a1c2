"""``relaydiff convert SRC DST.safetensors``: import a released EDM ``.pkl`` or RDM ``.pt``
without running code from it (docs/pretrained.md)."""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
import zipfile

from .common import CLIError, existing_file, one_line


def add_parser(subparsers) -> argparse.ArgumentParser:
    from relaydiff.models.convert import RELAY_PRESETS, STAGES
    p = subparsers.add_parser(
        "convert", help="convert a released EDM .pkl / RDM .pt checkpoint to a relaydiff .safetensors file",
        description="Read the EMA network of an EDM network pickle (.pkl) or an RDM training state (.pt) with "
                    "a restricted unpickler (no code from the file runs), rebuild it as relaydiff's U-Net and "
                    "write its weights and configuration to one .safetensors file.")
    p.add_argument("src", help="EDM network pickle (.pkl) or RDM training state (.pt)")
    p.add_argument("dst", help="output file (.safetensors)")
    p.add_argument("--stage", choices=STAGES, default=None,
                   help="base (stage 1) or relay model; inferred from an EDM pickle's loss, required for an "
                        "RDM .pt unless --relay is given")
    p.add_argument("--relay", choices=sorted(RELAY_PRESETS), default=None,
                   help="relay settings of a released RDM relay stage (implies --stage relay)")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args) -> int:
    from relaydiff.models import convert_checkpoint
    from relaydiff.models.convert import UnknownSourceWarning
    existing_file(args.src, "SRC")
    if not args.dst.endswith(".safetensors"):
        raise CLIError(f"DST {args.dst!r} must end with .safetensors")
    if os.path.exists(args.dst) and not args.force:
        raise CLIError(f"DST {args.dst!r} exists (pass --force to overwrite)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnknownSourceWarning)   # printed below, from the metadata
            # bars only on a terminal, where they are erased: never fragments before an error line
            dst, meta = convert_checkpoint(args.src, args.dst, stage=args.stage, relay=args.relay,
                                           progress=not args.quiet and sys.stderr.isatty())
    except (ValueError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, RecursionError) as e:
        # ForbiddenGlobal is an UnpicklingError, ConversionError a ValueError
        raise CLIError(f"{args.src}: {one_line(e)}") from None
    net, src = meta["network"], meta["source"]
    for message in src.get("warnings", ()):
        print(f"relaydiff convert: warning: {message}", file=sys.stderr)
    kind = f"{net.get('model_type', 'DhariwalUNet')} under {src['class_name']}"
    relay = f", relay p={meta['relay']['patch_size']} T={meta['relay']['truncation']}" if meta["relay"] else ""
    print(f"{dst}: {meta['stage']} model{relay}, {net['img_resolution']}px, label_dim {net['label_dim']}, "
          f"{kind}, channels {net['model_channels']} x {net['channel_mult']}, use_fp16 {src['use_fp16']} "
          f"(from {src['format']} {src['file']})")
    return 0
