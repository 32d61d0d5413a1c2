"""Share of one 64->256 relay sampler step spent outside the network, measured on a GPU.

The imagenet256-relay network (ADM, ~553M parameters, random weights: the cost does not depend
on them) under bf16 autocast, the imagenet256 sampler preset's relay settings (classifier-free
guidance 3.5: each denoiser call runs the network on the doubled batch; s_noise 0.2; Heun),
batch 8, float32 sampler state. Timed with CUDA synchronisation, median of several repeats:

* ``step``: ``sample_relay`` over one Heun step between two nonzero levels (2 denoiser calls,
  2 ``relay_step`` launches, the blur-time and factor bookkeeping) with the real network;
* ``network``: the same 2 guided denoiser calls alone, on the same inputs;
* ``free``: ``sample_relay`` over that step with a denoiser that costs nothing (returns a
  cached tensor): everything the sampler does besides the network.

Outside share = (step - network) / step, and free / step; plus, from torch.profiler, the
device time of relaydiff's kernels over the device time of the whole step.

    python bench/gpu_pipeline_step.py [--batch 8] [--repeats 7] [--out step.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from relaydiff.config import RelayConfig
from relaydiff.models import build_model, network_kwargs
from relaydiff.sampling import sample_relay
from relaydiff.sampling.guidance import cfg
from relaydiff.sampling.presets import PRESETS


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over ``repeats`` calls after 2 warm-ups, synchronised."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_pipeline_step: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = build_model(network_kwargs("imagenet256-relay", label_dim=1000))
    model.eval().requires_grad_(False)
    model.amp = "bfloat16"
    build_s = time.perf_counter() - t0
    rs = PRESETS["imagenet256"].relay
    config = RelayConfig.imagenet256()
    b = args.batch
    x = torch.randn(b, 3, 256, 256, device="cuda") * 0.5
    labels = torch.nn.functional.one_hot(torch.arange(b, device="cuda") % 1000, 1000).float()
    sigmas = torch.tensor([0.50, 0.45], dtype=torch.float64)   # one Heun step between nonzero levels
    denoiser = cfg(model, rs.cfg)
    cached = torch.zeros_like(x)
    free = lambda x_, sigma, class_labels=None: cached  # noqa: E731
    kw = dict(class_labels=labels, s_noise=rs.s_noise, seed=0, disable=True)

    def step(d):
        with torch.no_grad():
            return sample_relay(d, x, sigmas, config, **kw)

    def network():
        with torch.no_grad():
            s = torch.full((b,), 0.5, dtype=torch.float64, device="cuda")
            denoiser(x, s, labels)
            denoiser(x, s * 0.9, labels)

    t_step = timed(lambda: step(denoiser), args.repeats)
    t_net = timed(network, args.repeats)
    t_free = timed(lambda: step(free), args.repeats)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch": b,
           "parameters": sum(p.numel() for p in model.parameters()), "build_s": build_s,
           "cfg": rs.cfg, "ms_step": 1e3 * t_step, "ms_network": 1e3 * t_net, "ms_free": 1e3 * t_free,
           "outside_share": (t_step - t_net) / t_step, "free_share": t_free / t_step}
    try:  # device time of relaydiff's own kernels within the step
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(denoiser)
            torch.cuda.synchronize()
        # self device time per kernel name (self_cuda_time_total before torch 2.4)
        us = {e.key: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
              for e in prof.key_averages()}
        total = sum(us.values())
        ours = sum(t for k, t in us.items() if "tile_kernel" in k)
        res["profiler_relay_kernel_share"] = ours / total if total else None
        res["profiler_relay_kernel_us"] = ours
        res["profiler_total_device_us"] = total
    except Exception as e:  # the timings above stand without it
        res["profiler_error"] = f"{type(e).__name__}: {e}"[:200]
    print(f"{res['device']}, torch {res['torch']}: imagenet256-relay ({res['parameters'] / 1e6:.0f}M "
          f"parameters) batch {b}, bf16 autocast, CFG {rs.cfg}, one Heun relay step")
    print(f"  step {res['ms_step']:.2f} ms | network alone {res['ms_network']:.2f} ms | "
          f"sampler with a free denoiser {res['ms_free']:.3f} ms")
    print(f"  outside the network: {100 * res['outside_share']:.2f}% (step - network), "
          f"{100 * res['free_share']:.2f}% (free / step)"
          + (f"; relaydiff kernels {100 * res['profiler_relay_kernel_share']:.2f}% of device time"
             if res.get("profiler_relay_kernel_share") is not None else ""))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
