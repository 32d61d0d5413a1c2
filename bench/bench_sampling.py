"""Per-step cost of the relay sampler outside the network (issue 5 benchmark).

``sample_relay`` with a denoiser that costs nothing, at ``[8, 3, 256, 256]`` float32, on a
grid of 4 Heun steps (2 ``relay_step`` calls each), against the same sampler with

* ``reference``: the pure-PyTorch twin of ``relay_step`` (``relaydiff.ops.reference``),
  which reproduces the fused op's Philox noise element by element;
* ``unfused``: the algorithm as plain PyTorch code usually writes it (the authors' style):
  patch DCTs of ``x`` and ``D`` by einsum, coefficient scaling, inverse DCT, and noise from
  ``torch.randn`` with block noise by circular pad + ``avg_pool2d``.

    python bench/bench_sampling.py               # ms per step (wall and CPU) and ratios
    pytest bench/bench_sampling.py               # the same as pytest-benchmark cases

Target (issue 5): fused >= 6x faster than the reference sampler on this CPU.
"""
from __future__ import annotations

import math
import time
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from relaydiff import RelayConfig, ops
from relaydiff.ops import reference as R
from relaydiff.sampling import relay as relay_module
from relaydiff.sampling import sample_relay

SHAPE = (8, 3, 256, 256)
SIGMAS = torch.tensor([0.9, 0.6, 0.4, 0.25, 0.15], dtype=torch.float64)   # 4 steps, no final 0
STEPS = SIGMAS.numel() - 1
CONFIG = RelayConfig()


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    target = torch.rand(SHAPE, generator=g) * 2 - 1
    return x, (lambda x, sigma, class_labels=None: target)


def run_fused(x, denoiser, s_noise):
    return sample_relay(denoiser, x, SIGMAS, CONFIG, s_noise=s_noise, seed=0, disable=True)


def run_reference(x, denoiser, s_noise):
    with mock.patch.object(relay_module, "relay_step", R.relay_step):
        return sample_relay(denoiser, x, SIGMAS, CONFIG, s_noise=s_noise, seed=0, disable=True)


def _box_noise(like: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    e2 = torch.randn(like.shape, generator=g)
    return F.avg_pool2d(F.pad(e2, (s - 1, 0, s - 1, 0), mode="circular"), s, stride=1) * s


def run_unfused(x, denoiser, s_noise):
    """Algorithm 1 as straightforward PyTorch (fresh noise per draw, like the authors' code)."""
    c, p = CONFIG, CONFIG.patch_size
    g = torch.Generator().manual_seed(0)
    taus = c.tau_of_sigma(SIGMAS).tolist()
    sig = SIGMAS.tolist()

    def scale(u, f):
        b, ch, h, w = u.shape
        return (u.reshape(b, ch, h // p, p, w // p, p) * f.to(u.dtype)[None, None, None, :, None, :]).reshape(u.shape)

    def noise():
        if s_noise == 0.0:
            return 0.0
        n = torch.randn(x.shape, generator=g) + c.alpha * _box_noise(x, c.block_size, g)
        return n / math.sqrt(1 + c.alpha ** 2)

    for i in range(STEPS):
        sc, sn = sig[i], sig[i + 1]
        ac, an = R.blur_factors(taus[i], p, c.min_scale), R.blur_factors(taus[i + 1], p, c.min_scale)
        gamma = math.sqrt(1 - s_noise ** 2) * sn / sc
        A, B = an + gamma * (1 - ac), gamma * ac - an
        den = denoiser(x, x.new_full((x.shape[0],), sc))
        u = R.patch_dct(x, p)
        d = (u - R.patch_dct(den, p)) / sc
        x_prop = R.patch_idct(scale(u, A) + sc * scale(d, B), p) + s_noise * sn * noise()
        den2 = denoiser(x_prop, x.new_full((x.shape[0],), sn))
        d2 = (R.patch_dct(x_prop, p) - R.patch_dct(den2, p)) / sn
        x = R.patch_idct(scale(u, A) + sc * scale(0.5 * (d + d2), B), p) + s_noise * sn * noise()
    return x


RUNNERS = {"fused": run_fused, "reference": run_reference, "unfused": run_unfused}
S_NOISE = (0.2, 0.0)   # the default stochasticity, and none (separates the cost of the noise)


@pytest.mark.parametrize("s_noise", S_NOISE)
@pytest.mark.parametrize("name", list(RUNNERS))
def test_relay_sampler_step(benchmark, name, s_noise):
    torch.set_num_threads(2)
    x, den = _inputs()
    benchmark.group = f"sample_relay, s_noise {s_noise}, {STEPS} steps at {list(SHAPE)} ({ops.backend()})"
    benchmark.extra_info["steps"] = STEPS
    benchmark.pedantic(RUNNERS[name], args=(x, den, s_noise), rounds=3, iterations=1, warmup_rounds=1)


def _measure(x, den, s_noise: float, rounds: int) -> dict[str, tuple[float, float]]:
    """Best wall and process-CPU seconds per step of each runner. Rounds interleave the
    runners, so load from other processes hits them alike."""
    best = {name: (math.inf, math.inf) for name in RUNNERS}
    for fn in RUNNERS.values():
        fn(x, den, s_noise)
    for _ in range(rounds):
        for name, fn in RUNNERS.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn(x, den, s_noise)
            w, c = time.perf_counter() - w0, time.process_time() - c0
            best[name] = (min(best[name][0], w / STEPS), min(best[name][1], c / STEPS))
    return best


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="relay sampler overhead per step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x, den = _inputs()
    print(f"backend: {ops.backend()}, threads: {torch.get_num_threads()}, shape {list(SHAPE)} float32, "
          f"{STEPS} Heun steps, best of {a.rounds}")
    for s_noise in S_NOISE:
        best = _measure(x, den, s_noise, a.rounds)
        fw, fc = best["fused"]
        for name, (w, c) in best.items():
            print(f"s_noise {s_noise}  {name:>9}: {1e3 * w:7.1f} ms wall ({w / fw:5.1f}x fused)  "
                  f"{1e3 * c:7.1f} ms CPU ({c / fc:5.1f}x fused) per step")
