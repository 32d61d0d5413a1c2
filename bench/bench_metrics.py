"""Benchmarks of relaydiff.metrics and relaydiff.analysis (pytest-benchmark). Run:

    pytest bench/bench_metrics.py --benchmark-columns=median,iqr,rounds

Inception feature extraction uses random weights of the TF architecture (speed does not
depend on the values), on CPU and, when present, CUDA; ``images/s`` is in extra_info.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from relaydiff.analysis import frequency_study
from relaydiff.metrics import InceptionFeatures, InceptionLayers, frechet_distance, precision_recall, swd
from relaydiff.metrics.features import _ieee_float32

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random_net() -> InceptionFeatures:
    layers = InceptionLayers()
    with torch.no_grad():
        for name, p in layers.named_parameters():
            if name.endswith("weight"):
                p.normal_(0.0, math.sqrt(2.0 / p[0].numel()))
    return InceptionFeatures(layers.eval(), fingerprint="random")


@pytest.mark.parametrize("device", DEVICES)
def test_inception_features(benchmark, device):
    batch = 16 if device == "cpu" else 250
    net = _random_net().to(device)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)

    def run():
        with _ieee_float32():
            out = net(images)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()
    benchmark.pedantic(run, rounds=3 if device == "cpu" else 10, iterations=1)
    benchmark.extra_info["images/s"] = batch / benchmark.stats.stats.median


@pytest.mark.parametrize("device", DEVICES)
def test_precision_recall_5k(benchmark, device):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(5000, 2048, generator=g), torch.randn(5000, 2048, generator=g)
    benchmark.pedantic(precision_recall, args=(real, fake), kwargs={"device": device}, rounds=2, iterations=1)


def test_frechet_distance_2048(benchmark):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 4096)) / 64
    s1, s2 = a @ a.T, a @ a.T + 1e-2 * np.eye(2048)
    benchmark.pedantic(frechet_distance, args=(np.zeros(2048), s1, np.zeros(2048), s2), rounds=1, iterations=1)


def test_swd_64_images_128px(benchmark):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 3, 128, 128, generator=g)
    b = torch.rand(64, 3, 128, 128, generator=g)
    benchmark.pedantic(swd, args=(a, b), rounds=2, iterations=1)


def test_frequency_study_11x256(benchmark):
    images = torch.rand(11, 3, 256, 256, dtype=torch.float64) * 2 - 1
    benchmark.pedantic(frequency_study, args=(images,), rounds=2, iterations=1)
