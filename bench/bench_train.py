"""Training-step time with the fused relay corruption vs the pure-PyTorch reference.

    PYTHONPATH=. python -m pytest bench/bench_train.py --benchmark-columns=mean,stddev,rounds

Model: the ``tiny`` preset at 64x64 (relay stage 16 -> 64), batch 8, float32, Adam. The
issue's target is corruption under 2% of a CPU training step with the fused op; the
``corruption`` rows give the op alone, the ``step`` rows a whole optimizer step. Also times
the base stage at 16x16 (``tiny``), whose steps/s the tiny preset promises to keep high.

Measured on 2 cores (``taskset -c 0,1``, 2 threads, Xeon host of an H100 machine): fused
corruption 4.07 ms, reference 20.3 ms; relay step 431 ms (fused) vs 456 ms (reference), so
the fused corruption is 0.9% of a step; base step at 16x16 75.8 ms.
"""
from __future__ import annotations

import pytest
import torch

from relaydiff import ops
from relaydiff.config import RelayConfig
from relaydiff.diffusion import EDMLoss, RelayLoss
from relaydiff.models import build_model, network_kwargs
from relaydiff.ops import reference

CORRUPT = {"fused": ops.relay_corrupt, "reference": reference.relay_corrupt}
BATCH = 8


def _step_fn(loss_fn, res: int):
    torch.manual_seed(0)
    model = build_model(network_kwargs("tiny", res)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.rand(BATCH, 3, res, res) * 2 - 1

    def step():
        loss = loss_fn(model, images)
        (loss.sum() / BATCH).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()   # warm-up: allocator, oneDNN primitives
    return step


@pytest.mark.parametrize("impl", list(CORRUPT))
def test_corruption(benchmark, impl):
    relay = RelayConfig()
    x0 = torch.rand(BATCH, 3, 64, 64) * 2 - 1
    sigma, tau = relay.sample_training(BATCH)
    benchmark.extra_info["backend"] = ops.backend() if impl == "fused" else "reference"
    benchmark(CORRUPT[impl], x0, sigma, tau, **relay.op_kwargs())


@pytest.mark.parametrize("impl", list(CORRUPT))
def test_relay_train_step_64(benchmark, impl):
    benchmark(_step_fn(RelayLoss(RelayConfig(), corrupt=CORRUPT[impl]), 64))


def test_base_train_step_16(benchmark):
    benchmark(_step_fn(EDMLoss(), 16))
