"""The relay stage's truncation x sampler levels trade-off on the demo's data (docs/demo.md).

    python bench/demo_sweep.py --out sweep_out --truncations 0.15,0.3,0.5,0.93 --steps 2000

Builds the demo's training set and held-out tiles (``relaydiff.demo.build_data``, same seed,
so the held-out tiles are the demo's), trains one relay stage per truncation with the
``tiny-relay`` recipe (16 px crops, batch 64) for the same number of optimizer steps (a
step budget, not a time budget, so runs compare fairly on a loaded machine), then
super-resolves the held-out tiles with each at K levels from its trained top (the
``short`` sampler preset with ``steps=K``), and once with the ``default`` preset (the
paper's style: cut at sigma 0.9, 23 levels, slope correction). Scores are the demo's
(``relaydiff.demo.superres_scores``). Writes ``OUT/sweep.json`` and ``OUT/sweep.md``.

Trainings run ``--parallel`` at a time with one thread each (two on a 2-core machine).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import pathlib
import time

import torch
import torch.nn.functional as F


def _train(args: tuple[str, str, float, int, int]) -> tuple[float, str]:
    data, out, truncation, steps, threads = args
    torch.set_num_threads(threads)
    from relaydiff.config import RelayConfig
    from relaydiff.training import TrainConfig, train
    from relaydiff.demo import PATCH, RELAY_PRESET, TILE
    t = time.monotonic()
    train(TrainConfig(stage="relay", data=data, out=out, preset=RELAY_PRESET, resolution=TILE, steps=steps,
                      relay=RelayConfig(patch_size=PATCH, block_size=PATCH, truncation=truncation), labels=False,
                      cache=True, workers=0, seed=1, quiet=True, log_every=50, checkpoint_every=10 ** 9,
                      sample_every=-1, keep=1))
    return truncation, f"{time.monotonic() - t:.0f} s"


def _row(scores: dict) -> dict:
    return {"psnr": float(scores["psnr"].mean()), "ssim": float(scores["ssim"].mean()),
            "consistency": float(scores["consistency"].mean()), "hf_psd": scores["hf_psd"], "swd": scores["swd"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="sweep_out")
    ap.add_argument("--truncations", default="0.15,0.3,0.5,0.93")
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps per relay stage")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--seeds", default="1,2", help="sampler seeds (scores are averaged)")
    ap.add_argument("--corrections", default="denoised,slope", help="relay Heun corrections to compare")
    args = ap.parse_args()

    from relaydiff.data.bundled import load_bundled_photos
    from relaydiff.demo import PATCH, build_data, superres_scores
    from relaydiff.pipeline import PipelineError, RelayPipeline
    from relaydiff.sampling import get_preset, nearest_upsample
    from relaydiff.pipeline import load_stage
    from relaydiff.config import RelayConfig

    out = pathlib.Path(args.out)
    truncs = [float(v) for v in args.truncations.split(",")]
    levels = [int(v) for v in args.levels.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    if not (out / "data" / "train.zip").exists():
        build_data(load_bundled_photos(), out, 8, 2000, seed=0, quiet=True)
    todo = [(str(out / "data" / "train.zip"), str(out / f"relay_T{t}"), t, args.steps, 1) for t in truncs
            if not (out / f"relay_T{t}" / "checkpoints" / "latest").exists()]
    with cf.ProcessPoolExecutor(max_workers=args.parallel) as ex:
        for t, took in ex.map(_train, todo):
            print(f"trained truncation {t} in {took}", flush=True)

    torch.set_num_threads(2)
    from relaydiff.demo import load_heldout
    truth, names = load_heldout(out)
    inputs = F.avg_pool2d(truth, PATCH)
    base = superres_scores({"nearest": nearest_upsample(inputs, PATCH),
                            "bicubic": F.interpolate(inputs, scale_factor=PATCH, mode="bicubic",
                                                     align_corners=False).clamp(-1, 1)}, truth)
    results = {"steps": args.steps, "heldout": names, "baselines": {k: _row(v) for k, v in base.items()}, "runs": []}
    short, default = get_preset("short"), get_preset("default")
    for t in truncs:
        model, meta = load_stage(out / f"relay_T{t}", "relay")
        config = RelayConfig.from_dict(meta["relay"])
        samplers = [(f"{k} levels, {c}", dataclasses.replace(short, relay=dataclasses.replace(
                        short.relay, steps=k, correction=c)))
                    for c in args.corrections.split(",") for k in levels
                    if k > 1 or c == "denoised"] + [("default preset", default)]   # 1 level: no correction
        for label, preset in samplers:
            pipe = RelayPipeline(None, model, config, sampler=preset, consistency=True)
            try:
                sr = [pipe.super_resolve(inputs, seed=s, disable=True) for s in seeds]
            except PipelineError:      # the default grid lies above a low truncation's top
                continue
            rows = [_row(superres_scores({"relay": x}, truth)["relay"]) for x in sr]
            mean = {m: sum(r[m] for r in rows) / len(rows) for m in rows[0]}
            results["runs"].append({"truncation": t, "sigma_max": config.sigma_max, "sampler": label,
                                    "nfe": pipe.last_nfe["relay"], "start_sigma": float(pipe.relay_sigmas()[0]),
                                    **mean})
            r = results["runs"][-1]
            print(f"T={t} {label:20s} NFE {r['nfe']:3d}  PSNR {r['psnr']:.2f}  SSIM {r['ssim']:.3f}  "
                  f"hf {r['hf_psd']:.2f}  SWD {r['swd']:.1f}", flush=True)
    (out / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| truncation (sigma_max) | sampler | NFE | PSNR dB | SSIM | hf \\|ln PSD ratio\\| | SWD |",
             "|---|---|---|---|---|---|---|"]
    for k, v in results["baselines"].items():
        lines.append(f"| {k} | | | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['hf_psd']:.2f} | {v['swd']:.1f} |")
    for r in results["runs"]:
        lines.append(f"| {r['truncation']} ({r['sigma_max']:.3g}) | {r['sampler']} (from {r['start_sigma']:.3g}) | "
                     f"{r['nfe']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['hf_psd']:.2f} | {r['swd']:.1f} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
