"""``relaydiff analyze``: the frequency analysis of the paper (Fig. 2, Fig. 8, App. D) on
photos -- PSD and SNR plots (PNG) and their numbers (CSV)."""
from __future__ import annotations

import json
import math
import os

from .common import CLIError, add_image_limit, apply_image_limit, existing_dir, one_line

OUTPUTS = ("noise_psd.png", "psd.png", "snr.png", "psd.csv", "snr.csv", "summary.json")
# photos are decoded and analysed this many pixels (per channel) at a time -- 32 photos at 256 px,
# ~0.4 GB of float64 work -- so memory is bounded by one batch, not by the number of photos
BATCH_PIXELS = 32 * 256 * 256


def add_parser(subparsers):
    p = subparsers.add_parser(
        "analyze", help="PSD/SNR frequency analysis of images under white and block noise",
        description="Radially binned DCT power spectra and SNR curves of images corrupted by white noise "
                    "at low resolution (nearest-upsampled), white noise and block noise at high resolution "
                    "(paper Fig. 2, Fig. 8, App. D). Writes " + ", ".join(OUTPUTS) + ".")
    p.add_argument("--images", metavar="DIR",
                   help="folder (or .zip) of photos; default: the photos bundled with scikit-image and scikit-learn")
    p.add_argument("--out", default="relaydiff-analysis", metavar="DIR",
                   help="output folder, created if missing (default ./relaydiff-analysis)")
    p.add_argument("--resolution", type=int, default=256, help="high resolution H = W (default 256)")
    p.add_argument("--factor", type=int, default=4, help="low resolution = resolution / factor (default 4)")
    p.add_argument("--block-size", type=int, default=4, help="block-noise kernel size s (default 4)")
    p.add_argument("--sigmas", default="0.1,0.3,1,3", help="noise levels, comma-separated (default 0.1,0.3,1,3)")
    p.add_argument("--bins", type=int, default=64, help="radial frequency bins (default 64)")
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_image_limit(p)
    return p


def _check(args) -> tuple[float, ...]:
    try:
        sigmas = tuple(float(s) for s in args.sigmas.split(",") if s.strip())
    except ValueError:
        raise CLIError(f"--sigmas {args.sigmas!r}: expected comma-separated numbers such as 0.1,0.3,1") from None
    if not sigmas or any(not (s > 0 and math.isfinite(s)) for s in sigmas):
        raise CLIError(f"--sigmas {args.sigmas!r}: every sigma must be a positive number")
    if args.factor < 1 or args.resolution < 16 or args.resolution % args.factor:
        raise CLIError(f"--resolution {args.resolution} must be >= 16 and a multiple of --factor {args.factor} (>= 1)")
    if not 1 <= args.block_size <= min(16, args.resolution):
        raise CLIError(f"--block-size must be in [1, 16]; got {args.block_size}")
    if args.bins < 2:
        raise CLIError(f"--bins must be >= 2; got {args.bins}")
    if args.max_images is not None and args.max_images < 1:
        raise CLIError(f"--max-images must be >= 1; got {args.max_images}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out!r} exists and is not a folder")
    return sigmas


def _photos(args) -> tuple[int, object]:
    """``(count, iterable of uint8 [H, W, 3])`` of the photos to analyse."""
    if args.images is None:
        from relaydiff.data.bundled import load_bundled_photos
        try:
            photos = list(load_bundled_photos().values())[: args.max_images]
        except ImportError as e:
            raise CLIError(f"{e} (or pass --images DIR)") from e
        return len(photos), photos
    from relaydiff.metrics.images import open_images
    if not args.images.lower().endswith(".zip"):
        existing_dir(args.images, "--images")
    try:
        source = open_images(args.images, "--images")
    except ValueError as e:
        raise CLIError(str(e)) from e
    n = len(source) if args.max_images is None else min(len(source), args.max_images)
    return n, (source.read_square(i, args.resolution) for i in range(n))   # the square only: wide images stay cheap


def _batches(photos, resolution: int):
    """The photos as float64 batches of ``BATCH_PIXELS / resolution^2`` images (at least one),
    each made as the study reaches it; an unreadable image, or one too small for
    ``resolution``, is a :class:`CLIError`."""
    from relaydiff.analysis import photo_batches
    try:
        yield from photo_batches(photos, resolution, max(1, BATCH_PIXELS // (resolution * resolution)))
    except ValueError as e:
        raise CLIError(one_line(e)) from None


def run(args) -> int:
    from tqdm.auto import tqdm

    from relaydiff.analysis import frequency_study_stream
    from relaydiff.analysis.plots import write_report

    sigmas = _check(args)
    try:
        import matplotlib  # noqa: F401  (the plots need it; fail before anything is written)
    except ImportError:
        raise CLIError("the plots need matplotlib: pip install 'relaydiff[demo]'") from None
    apply_image_limit(args)
    n, photos = _photos(args)
    batches = _batches(tqdm(photos, total=n, desc="photos", disable=args.quiet), args.resolution)
    study = frequency_study_stream(batches, sigmas=sigmas, factor=args.factor, block_size=args.block_size,
                                   num_bins=args.bins, seed=args.seed)
    claims = study.claims()
    os.makedirs(args.out, exist_ok=True)
    written = write_report(study, args.out)
    summary = os.path.join(args.out, "summary.json")
    with open(summary, "w") as f:
        json.dump({"images": args.images or "bundled", "n_images": study.num_images,
                   "resolution": args.resolution, "factor": args.factor, "block_size": args.block_size,
                   "sigmas": list(sigmas),
                   "low_band_bins": int(study.low_band().sum()), **claims}, f, indent=2)
    low = args.resolution // args.factor
    print(f"{study.num_images} images at {args.resolution} px; low bands f < pi/{args.factor} ({int(study.low_band().sum())} bins):")
    print(f"  mean |ln PSD ratio| to white noise at {low} px upsampled: block noise {claims['block_vs_white_low']:.3f}, "
          f"white noise at {args.resolution} px {claims['white_vs_white_low']:.3f}")
    print(f"  median SNR ratio white@{args.resolution} / white@{low}: {claims['snr_gain_resolution']:.2f}; "
          f"block@{args.resolution} / white@{low}: {claims['snr_block_vs_white_low']:.2f}")
    print("wrote " + ", ".join(written + [summary]))
    return 0
