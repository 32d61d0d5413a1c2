"""``relaydiff upscale``: super-resolve a folder of images with a relay checkpoint.

    relaydiff upscale --stage2 RUN2 --in low/ --out high/

The relay stage continues the diffusion from each input (paper App. C.3), so it also
cleans noise and artifacts in it. Inputs must have the size the relay model expects
(its resolution / patch size) unless ``--resize``; outputs are ``OUT/<name>.png``.
``--seeds 0-63`` (or ``1,5,8-9``) gives the inputs, sorted by name, one seed each: output ``k``
then depends on input ``k`` and seed ``k`` alone, whatever ``--batch`` (EDM's convention).
``--class seed-mod`` with ``--seeds`` gives the image of seed ``s`` the class ``s % classes``, as
the authors' generate scripts label their images.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from .common import CLIError, add_image_limit, apply_image_limit, existing_dir
from .sample import add_sampler_args, checkpoint_path, class_labels_for, load_pipeline, parse_int, parse_seeds, \
    parse_steps, post_process


def add_parser(subparsers):
    p = subparsers.add_parser("upscale", help="super-resolve a folder of images with a relay model",
                              description="Super-resolve a folder of images with a relay model.",
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage2", required=True, nargs="+", metavar="CKPT",
                   help="relay run directory or checkpoint file (several: a cascade, lowest first)")
    p.add_argument("--in", required=True, dest="in_dir", metavar="DIR", help="folder of input images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--steps", metavar="N", help="relay grid size before truncation (default: the preset's)")
    p.add_argument("--seeds", metavar="LIST", help="one seed per input image in sorted order, e.g. 0-63 or "
                   "1,5,8-9: output k depends on input k and seed k alone, whatever --batch (EDM's "
                   "convention); replaces --seed")
    p.add_argument("--resize", action="store_true",
                   help="resize inputs (Lanczos) to the size the relay model expects")
    add_sampler_args(p)
    add_image_limit(p)
    return p


def run(args) -> int:
    from relaydiff.images import from_uint8, list_images, load_image, save_png

    if args.seeds is not None and args.seed is not None:
        raise CLIError("--seeds gives every input image its seed; it replaces --seed")
    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    batch = parse_int(args.batch, "--batch")
    seed = parse_int(args.seed or "0", "--seed", low=0)
    class_labels_for(args, None, 0, seeds)
    _, steps = parse_steps(args.steps)
    post = post_process(args)
    apply_image_limit(args)
    existing_dir(args.in_dir, "--in")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out!r} exists and is not a directory")
    if os.path.exists(args.out) and os.path.samefile(args.in_dir, args.out):
        raise CLIError("--out must differ from --in")
    paths = list_images(args.in_dir)
    if not paths:
        raise CLIError(f"--in {args.in_dir!r} holds no images (.png, .jpg, ...)")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[0]
        raise CLIError(f"--in holds several images named {dup!r} (different suffixes); outputs would collide")
    if seeds is not None and len(seeds) != len(paths):
        raise CLIError(f"--seeds names {len(seeds)} seeds for the {len(paths)} images in --in {args.in_dir!r}; "
                       f"give one seed per image (in sorted order)")
    stage2 = [checkpoint_path(s, "--stage2") for s in args.stage2]
    pipe = load_pipeline(None, stage2, args)

    channels, h, w = pipe.input_shape
    images = []
    for path in paths:
        img = load_image(path, channels, size=(h, w) if args.resize else None)
        if img.shape[:2] != (h, w):
            raise CLIError(f"{path} is {img.shape[1]}x{img.shape[0]}; the relay model expects "
                           f"{w}x{h} inputs (use --resize)")
        images.append(img)
    low = from_uint8(np.stack(images))
    labels = class_labels_for(args, pipe, len(paths), seeds)

    high = pipe.super_resolve(low, labels, steps=steps, seed=None if seeds is not None else seed, seeds=seeds,
                              batch_size=batch, disable=True if args.quiet else None)
    os.makedirs(args.out, exist_ok=True)
    for stem, img in zip(stems, post(high)):
        save_png(img, os.path.join(args.out, f"{stem}.png"))
    if not args.quiet:
        print(f"wrote {len(paths)} images of {high.shape[-1]}px to {args.out} "
              f"(relay NFE per batch: {pipe.last_nfe.get('relay')})")
    return 0
