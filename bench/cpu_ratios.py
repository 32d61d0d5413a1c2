"""Side-by-side CPU ratios for the README: each round times every variant once, in turn,
so slow phases of a noisy machine hit all of them alike; the table reports the median
over rounds of each variant and the median of the per-round ratios.

    python bench/cpu_ratios.py [--rounds 30] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import composition as C  # noqa: E402

import relaydiff.ops as O  # noqa: E402


def variants(shape):
    g = torch.Generator().manual_seed(0)
    x, den = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    b = shape[0]
    sig = torch.linspace(0.2, 2.0, b, dtype=torch.float64)
    tau = torch.linspace(0.1, 3.0, b, dtype=torch.float64)
    sn, tn = sig * 0.5, tau * 0.5
    return {
        "relay_corrupt": (lambda: O.relay_corrupt(x, sig, tau, seed=1), lambda: C.corrupt(x, sig, tau)),
        "relay_step": (lambda: O.relay_step(x, den, sig, sn, tau, tn, seed=1),
                       lambda: C.step(x, den, sig, sn, tau, tn)),
        "mixed_noise": (lambda: O.mixed_noise(x, seed=1), lambda: C.mixed_noise(x, 0.15, 4)),
        "patch_dct": (lambda: O.patch_dct(x, 4), lambda: C.dct(x, 4)),
    }, (lambda: (torch.randn_like(x), torch.randn_like(x)))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"backend {O.backend()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    print("| op | shape | kernel ms | plain PyTorch ms | ratio | randn_like x2 ms | kernel / randn x2 |")
    print("|---|---|---|---|---|---|---|")
    for shape in [(8, 3, 256, 256), (64, 3, 64, 64)]:
        ops, randn2 = variants(shape)
        for name, (kern, comp) in ops.items():
            for f in (kern, comp, randn2):
                f()
            tk, tc, tr = [], [], []
            for _ in range(args.rounds):
                tk.append(timed(kern))
                tc.append(timed(comp))
                tr.append(timed(randn2))
            ratio = statistics.median(c / k for c, k in zip(tc, tk))
            vs_randn = statistics.median(k / r for k, r in zip(tk, tr))
            print(f"| {name} | {'x'.join(map(str, shape))} | {statistics.median(tk):.2f} | "
                  f"{statistics.median(tc):.2f} | {ratio:.1f}x | {statistics.median(tr):.2f} | {vs_randn:.2f} |")


if __name__ == "__main__":
    main()
