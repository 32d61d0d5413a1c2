"""Tests of relaydiff.pipeline and the ``relaydiff sample`` / ``relaydiff upscale`` commands.

The pipeline's logic is tested with small analytic denoisers (the posterior mean of
per-channel Gaussian data), so a whole two-stage run takes milliseconds. Loading and the
CLI run on real ``tiny`` U-Net checkpoints written by the trainer (``relaydiff.training``)
and by the models' checkpoint writer.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from relaydiff import RelayConfig
from relaydiff.cli import main
from relaydiff.models import EDMPrecond, build_model, load_model, network_kwargs, save_weights
from relaydiff.pipeline import PipelineError, RelayPipeline
from relaydiff.sampling import EDMSampling, RelaySampling, SamplerPreset, karras_sigmas, truncate_sigmas
from relaydiff.training import TrainConfig, train

FAST = SamplerPreset(EDMSampling(steps=6), RelaySampling(steps=12))


class GaussianDenoiser(torch.nn.Module):
    """``D(x; sigma, c) = m + v / (v + sigma^2) (x - m)`` with ``m = bias + c @ class_shift``:
    the exact denoiser of per-channel Gaussian data with variance ``v``."""

    def __init__(self, img_resolution: int, img_channels: int = 3, label_dim: int = 0, v: float = 0.1):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.v = img_resolution, img_channels, label_dim, v
        self.register_buffer("bias", torch.linspace(-0.3, 0.3, img_channels))
        self.register_buffer("class_shift", torch.linspace(-0.5, 0.5, max(label_dim, 1) * img_channels)
                             .reshape(max(label_dim, 1), img_channels))
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((x.shape[0], class_labels is not None and not bool(class_labels[-1].any())))
        m = self.bias[None, :, None, None].to(x.dtype)
        if class_labels is not None:
            m = m + (class_labels.to(x.dtype) @ self.class_shift.to(x.dtype))[:, :, None, None]
        s2 = sigma.to(x.dtype)[:, None, None, None] ** 2
        return m + self.v / (self.v + s2) * (x - m)


def _pipeline(label_dim=0, res=8, p=4, preset=FAST):
    config = RelayConfig(patch_size=p, block_size=p)
    return RelayPipeline(GaussianDenoiser(res, label_dim=label_dim), GaussianDenoiser(res * p, label_dim=label_dim),
                         config, sampler=preset)


def _relay_nfe(steps, cut=0.9):
    k = truncate_sigmas(karras_sigmas(steps, 0.008, 80.0), cut).numel() - 1
    return 2 * k - 1


# ---------------------------------------------------------------- pipeline

def test_sample_shapes_nfe_and_determinism():
    pipe = _pipeline()
    high, low = pipe.sample(5, seed=3, batch_size=2, return_low=True, disable=True)
    assert high.shape == (5, 3, 32, 32) and low.shape == (5, 3, 8, 8)
    assert high.abs().max() <= 1 and low.abs().max() <= 1
    assert pipe.last_nfe == {"stage1": 2 * 6 - 1, "relay": _relay_nfe(12)}
    assert torch.equal(high, pipe.sample(5, seed=3, batch_size=2, disable=True))
    assert (high - pipe.sample(5, seed=4, batch_size=2, disable=True)).abs().max() > 0.05
    # a batch is a function of (seed, its first image index): the first batch repeats alone
    assert torch.equal(high[:2], pipe.sample(2, seed=3, batch_size=2, disable=True))


def test_steps_override():
    pipe = _pipeline()
    pipe.sample(1, seed=0, steps=(4, 20), disable=True)
    assert pipe.last_nfe == {"stage1": 7, "relay": _relay_nfe(20)}
    pipe.sample(1, seed=0, steps=10, disable=True)
    assert pipe.last_nfe == {"stage1": 19, "relay": _relay_nfe(10)}


def test_class_labels():
    pipe = _pipeline(label_dim=4)
    by_index = pipe.sample(3, [0, 3, 1], seed=1, disable=True)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 3, 1]), 4).float()
    assert torch.equal(by_index, pipe.sample(3, one_hot, seed=1, disable=True))
    assert (by_index - pipe.sample(3, [2, 2, 2], seed=1, disable=True)).abs().max() > 0.05
    # without labels the classes are drawn from the seed
    assert torch.equal(pipe.sample(3, seed=2, disable=True), pipe.sample(3, seed=2, disable=True))
    with pytest.raises(ValueError, match="class indices"):
        pipe.sample(3, [0, 4, 1], seed=1, disable=True)
    with pytest.raises(ValueError, match="one-hot"):
        pipe.sample(3, torch.zeros(3, 5), seed=1, disable=True)
    with pytest.raises(ValueError, match="unconditional"):
        _pipeline().sample(2, [0, 1], disable=True)


def test_guidance_in_pipeline():
    preset = SamplerPreset(EDMSampling(steps=4), RelaySampling(steps=12, cfg=3.0))
    pipe = _pipeline(label_dim=2, preset=preset)
    pipe.sample(2, [0, 1], seed=0, disable=True)
    relay_calls = pipe.stage2.calls
    assert len(relay_calls) == _relay_nfe(12)
    # every guided call doubles the batch and its second half is unconditional (zero labels)
    assert all(b == 4 and uncond for b, uncond in relay_calls)
    assert all(b == 2 for b, _ in pipe.stage1.calls)


def test_super_resolve_and_cascade():
    pipe = _pipeline()
    low = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = pipe.super_resolve(low, seed=1, batch_size=2, disable=True)
    assert out.shape == (3, 3, 32, 32) and out.abs().max() <= 1
    assert torch.equal(out, pipe.super_resolve(low, seed=1, batch_size=2, disable=True))
    assert pipe.last_nfe == {"relay": _relay_nfe(12)}

    c2 = RelayConfig(patch_size=2, block_size=2)
    inner = RelayPipeline(GaussianDenoiser(4), GaussianDenoiser(8), c2, sampler=FAST)
    cascade = RelayPipeline(inner, GaussianDenoiser(16), c2, sampler=FAST)
    assert cascade.input_shape == (3, 4, 4) and cascade.out_shape == (3, 16, 16)
    high, mid = cascade.sample(2, seed=0, return_low=True, disable=True)
    assert high.shape == (2, 3, 16, 16) and mid.shape == (2, 3, 8, 8)
    assert cascade.super_resolve(torch.zeros(2, 3, 4, 4), seed=0, disable=True).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="channels"):
        cascade.super_resolve(torch.zeros(2, 1, 4, 4), disable=True)


def test_pipeline_errors():
    with pytest.raises(PipelineError, match="expects 8px inputs"):
        RelayPipeline(GaussianDenoiser(16), GaussianDenoiser(32), RelayConfig())
    with pytest.raises(PipelineError, match="low_shape"):
        RelayPipeline(lambda x, s, c=None: x, GaussianDenoiser(32), RelayConfig())
    with pytest.raises(PipelineError, match="super_resolve"):
        RelayPipeline(None, GaussianDenoiser(32), RelayConfig(), low_shape=(3, 8, 8)).sample(1, disable=True)
    with pytest.raises(ValueError, match="unknown sampler preset"):
        _pipeline(preset="fastest")
    with pytest.raises(ValueError, match="n must be"):
        _pipeline().sample(0, disable=True)


# ---------------------------------------------------------------- checkpoints

def _write_photos(folder, size=32, n=8):
    folder.mkdir()
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy], -1) * 0.45 + 0.5
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Real ``tiny`` U-Nets: a base (8px) and a relay (8 -> 32px) run directory written by
    ``relaydiff.training.train`` (one optimizer step each), and a relay checkpoint file for
    16px outputs written with the models' own checkpoint writer."""
    root = tmp_path_factory.mktemp("ckpt")
    data = _write_photos(root / "photos")
    common = dict(data=str(data), preset="tiny", batch=4, steps=1, quiet=True, workers=0, sample_every=-1,
                  seed=0, device="cpu")
    base = train(TrainConfig(stage="base", out=str(root / "base"), resolution=8, **common))
    relay = train(TrainConfig(stage="relay", out=str(root / "relay"), resolution=32,
                              relay=RelayConfig(blur_sigma_max=2.0), **common))
    net = network_kwargs("tiny", 16, label_dim=0)
    model = build_model(net)
    tensors = {f"{w}.{k}": v.clone() for w in ("model", "ema") for k, v in model.state_dict().items()}
    relay16 = save_weights(root / "relay16.safetensors", tensors, {
        "stage": "relay", "network": net, "precond": model.config(), "relay": RelayConfig().to_dict(),
        "step": 0, "kimg": 0.0, "resolution": 16, "label_dim": 0})
    return dict(base=str(base), relay=str(relay), relay16=str(relay16))


def test_from_checkpoints(checkpoints):
    pipe = RelayPipeline.from_checkpoints(checkpoints["base"], checkpoints["relay"], sampler=FAST)
    assert isinstance(pipe.stage1, EDMPrecond) and isinstance(pipe.stage2, EDMPrecond)
    assert not pipe.stage1.training and not pipe.stage2.training
    assert pipe.low_shape == (3, 8, 8) and pipe.config.blur_sigma_max == 2.0
    # the EMA weights of the newest checkpoint, exactly as load_model reads them
    ema, _ = load_model(checkpoints["relay"])
    for (k, a), b in zip(pipe.stage2.state_dict().items(), ema.state_dict().values()):
        assert torch.equal(a, b), k
    high, low = pipe.sample(2, seed=0, return_low=True, disable=True)
    assert high.shape == (2, 3, 32, 32) and low.shape == (2, 3, 8, 8)
    assert torch.isfinite(high).all() and high.abs().max() <= 1
    up = RelayPipeline.from_checkpoints(None, checkpoints["relay"], sampler=FAST)
    assert up.input_shape == (3, 8, 8)
    assert up.super_resolve(low, seed=1, disable=True).shape == (2, 3, 32, 32)
    with pytest.raises(PipelineError, match="'relay'-stage checkpoint, not a stage-1"):
        RelayPipeline.from_checkpoints(checkpoints["relay"], checkpoints["relay"])
    with pytest.raises(PipelineError, match="'base'-stage checkpoint, not a relay"):
        RelayPipeline.from_checkpoints(checkpoints["base"], checkpoints["base"])
    with pytest.raises(PipelineError, match="expects 4px inputs"):
        RelayPipeline.from_checkpoints(checkpoints["base"], checkpoints["relay16"])


# ---------------------------------------------------------------- CLI

def _run_cli(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr()


def _one_line_error(rc, cap, needle):
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], cap.err


def test_cli_sample(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    rc, cap = _run_cli(capsys, "sample", "--stage1", checkpoints["base"], "--stage2", checkpoints["relay"],
                       "--out", str(out), "--n", "3", "--steps", "4,12", "--seed", "7", "--grid",
                       "--save-low", "--batch", "2", "--quiet")
    assert rc == 0, cap.err
    names = sorted(os.listdir(out))
    assert names == ["000007.png", "000008.png", "000009.png", "grid.png", "low", "relaydiff-sample.json"]
    assert json.loads((out / "relaydiff-sample.json").read_text())["images"] == names[:3]
    for name in names[:3]:
        with Image.open(out / name) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
        with Image.open(out / "low" / name) as im:
            assert im.size == (8, 8)
    # the PNGs hold the pipeline's images (uint8 rounding of the same samples)
    pipe = RelayPipeline.from_checkpoints(checkpoints["base"], checkpoints["relay"], sampler=FAST)
    want = pipe.sample(3, seed=7, steps=(4, 12), batch_size=2, disable=True)
    got = torch.from_numpy(np.array(Image.open(out / "000008.png"))).permute(2, 0, 1).float() / 127.5 - 1
    assert (got - want[1]).abs().max() <= 1 / 127.5 + 1e-6


@pytest.mark.parametrize("n", ["0", "-2", "abc", "1.5"])
def test_cli_sample_bad_n(checkpoints, tmp_path, capsys, n):
    out = tmp_path / "out"
    rc, cap = _run_cli(capsys, "sample", "--stage1", checkpoints["base"], "--stage2", checkpoints["relay"],
                       "--out", str(out), "--n", n)
    _one_line_error(rc, cap, "--n must be an integer >= 1")
    assert not out.exists()


def test_cli_sample_checkpoint_errors(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    rc, cap = _run_cli(capsys, "sample", "--stage1", str(tmp_path / "nope"), "--stage2", checkpoints["relay"],
                       "--out", str(out))
    _one_line_error(rc, cap, "--stage1")
    rc, cap = _run_cli(capsys, "sample", "--stage1", checkpoints["relay"], "--stage2", checkpoints["relay"],
                       "--out", str(out), "--quiet")
    _one_line_error(rc, cap, "not a stage-1 (base) one")
    rc, cap = _run_cli(capsys, "sample", "--stage1", checkpoints["base"], "--stage2", checkpoints["base"],
                       "--out", str(out), "--quiet")
    _one_line_error(rc, cap, "not a relay (stage-2) one")
    rc, cap = _run_cli(capsys, "sample", "--stage1", checkpoints["base"], "--stage2", checkpoints["relay"],
                       "--out", str(out), "--class", "1", "--quiet")
    _one_line_error(rc, cap, "unconditional")
    assert not out.exists()


def _write_inputs(folder, size, names=("a", "b", "c")):
    folder.mkdir()
    g = np.random.default_rng(0)
    for name in names:
        Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{name}.png")


def test_cli_upscale(checkpoints, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _write_inputs(src, 8)
    rc, cap = _run_cli(capsys, "upscale", "--stage2", checkpoints["relay"], "--in", str(src), "--out", str(out),
                       "--steps", "12", "--batch", "2", "--quiet")
    assert rc == 0, cap.err
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "c.png"]
    with Image.open(out / "b.png") as im:
        assert im.size == (32, 32)

    big, out2 = tmp_path / "big", tmp_path / "out2"
    _write_inputs(big, 12)
    rc, cap = _run_cli(capsys, "upscale", "--stage2", checkpoints["relay"], "--in", str(big), "--out", str(out2))
    _one_line_error(rc, cap, "expects 8x8 inputs")
    assert not out2.exists()
    rc, cap = _run_cli(capsys, "upscale", "--stage2", checkpoints["relay"], "--in", str(big), "--out", str(out2),
                       "--resize", "--steps", "12", "--quiet")
    assert rc == 0 and len(os.listdir(out2)) == 3

    rc, cap = _run_cli(capsys, "upscale", "--stage2", checkpoints["base"], "--in", str(src), "--out", str(out2))
    _one_line_error(rc, cap, "not a relay (stage-2) one")
    rc, cap = _run_cli(capsys, "upscale", "--stage2", checkpoints["relay"], "--in", str(tmp_path / "missing"),
                       "--out", str(out2))
    _one_line_error(rc, cap, "--in")
    rc, cap = _run_cli(capsys, "upscale", "--stage2", str(tmp_path / "missing.safetensors"), "--in", str(src),
                       "--out", str(out2))
    _one_line_error(rc, cap, "--stage2")


# ---------------------------------------------------------------- trained top, consistency

def test_relay_grid_never_above_trained_top(capsys):
    """A relay stage trained with truncation T has seen no level above RelayConfig.sigma_max:
    the pipeline drops the preset's levels above it with one notice, or refuses."""
    config = RelayConfig(truncation=0.15)
    top = config.sigma_max
    assert 0.08 < top < 0.09                                   # exp(-1.2 + 1.2 Phi^-1(0.15))
    pipe = RelayPipeline(GaussianDenoiser(8), GaussianDenoiser(32), config, sampler="default")
    full = RelaySampling().sigmas()                            # starts at 0.865 > top
    grid = pipe.relay_sigmas()
    assert float(grid[0]) <= top and torch.equal(grid, full[full <= top])
    pipe.sample(2, seed=0, disable=True)
    pipe.super_resolve(torch.zeros(1, 3, 8, 8), seed=0, disable=True)
    err = capsys.readouterr().err
    assert err.count("trained up to sigma") == 1 and f"{top:.4g}" in err
    # a grid that starts at the trained top keeps all its levels and says nothing
    at_top = SamplerPreset(EDMSampling(steps=4), RelaySampling(steps=5, sigma_max=None))
    pipe = RelayPipeline(GaussianDenoiser(8), GaussianDenoiser(32), config, sampler=at_top)
    grid = pipe.relay_sigmas()
    assert grid.numel() == 6 and float(grid[0]) == pytest.approx(top, rel=1e-12) and float(grid[-1]) == 0
    pipe.sample(1, seed=0, disable=True)
    assert pipe.last_nfe["relay"] == 2 * 5 - 1 and capsys.readouterr().err == ""
    # nothing left below the top: refuse
    high = SamplerPreset(EDMSampling(steps=4), RelaySampling(steps=3, sigma_min=0.5, sigma_max=80.0))
    with pytest.raises(PipelineError, match="trained top"):
        RelayPipeline(GaussianDenoiser(8), GaussianDenoiser(32), config, sampler=high).relay_sigmas()
    with pytest.raises(ValueError, match="trained_max"):
        RelaySampling(sigma_max=None).sigmas()


def test_consistency_keeps_patch_means():
    """consistency=True: the output box-downsamples to the input exactly (before clamping),
    and only the DC coefficients of each prediction change (an orthogonal projection)."""
    from relaydiff.ops import patch_dct
    from relaydiff.pipeline import PatchMeanConsistency
    g = torch.Generator().manual_seed(0)
    low = torch.rand(3, 3, 8, 8, generator=g) * 0.8 - 0.4
    plain = _pipeline(preset=FAST)
    kept = RelayPipeline(plain.stage1, plain.stage2, plain.config, sampler=FAST, consistency=True)
    out_plain = plain.super_resolve(low, seed=1, disable=True)
    out = kept.super_resolve(low, seed=1, disable=True)
    pooled = torch.nn.functional.avg_pool2d(out, 4)
    unclamped = torch.nn.functional.avg_pool2d((out.abs() >= 1).float(), 4) == 0   # clamping moves means
    assert unclamped.float().mean() > 0.5
    assert (pooled - low)[unclamped].abs().max() < 1e-5
    assert (torch.nn.functional.avg_pool2d(out_plain, 4) - low).abs().max() > 1e-2
    den = PatchMeanConsistency(plain.stage2, low, 4)
    x = torch.randn(3, 3, 32, 32, generator=g)
    sigma = torch.full((3,), 0.3)
    d0, d1 = patch_dct(plain.stage2(x, sigma), 4), patch_dct(den(x, sigma), 4)
    ac = torch.ones(4, 4, dtype=torch.bool)
    ac[0, 0] = False
    ac = ac.repeat(8, 8)
    torch.testing.assert_close(d1[..., ac], d0[..., ac], rtol=0, atol=1e-5)
    torch.testing.assert_close(d1[..., ~ac], 4 * low.flatten(-2), rtol=0, atol=1e-5)  # DC = p * mean
    with pytest.raises(TypeError, match="consistency"):
        RelayPipeline(plain.stage1, plain.stage2, plain.config, consistency="yes")


# ---------------------------------------------------------------- streaming, resumable sample

def test_iter_sample_resumes_bit_identically(checkpoints):
    pipe = RelayPipeline.from_checkpoints(checkpoints["base"], checkpoints["relay"], sampler=FAST)
    want = pipe.sample(5, seed=3, steps=(3, 6), batch_size=2, disable=True)
    got = list(pipe.iter_sample(5, seed=3, steps=(3, 6), batch_size=2, start=2, disable=True))
    assert [j for j, _, _ in got] == [2, 4]
    assert torch.equal(torch.cat([h for _, h, _ in got]), want[2:])
    with pytest.raises(ValueError, match="start must be a multiple of batch_size"):
        next(pipe.iter_sample(5, seed=3, batch_size=2, start=1))
    with pytest.raises(ValueError, match="needs the seed"):
        next(pipe.iter_sample(5, batch_size=2, start=2))


def _pngs(folder):
    return {f: np.array(Image.open(folder / f)) for f in sorted(os.listdir(folder)) if f.endswith(".png")}


def test_cli_sample_streams_and_resumes(checkpoints, tmp_path, capsys, monkeypatch):
    args = ["sample", "--stage1", checkpoints["base"], "--stage2", checkpoints["relay"], "--n", "5",
            "--batch", "2", "--steps", "3,6", "--seed", "4", "--save-low", "--grid", "--quiet"]
    full = tmp_path / "full"
    assert _run_cli(capsys, *args, "--out", str(full))[0] == 0
    # a run killed after its second batch: the first two batches are on disk, the run is unfinished
    batches = []
    real = RelayPipeline.iter_sample

    def killed(self, *a, **k):
        for item in real(self, *a, **k):
            batches.append(item[0])
            yield item
            if len(batches) == 2:
                raise KeyboardInterrupt

    part = tmp_path / "part"
    monkeypatch.setattr(RelayPipeline, "iter_sample", killed)
    rc, cap = _run_cli(capsys, *args, "--out", str(part))
    assert rc == 130 and "--resume" in cap.err
    assert sorted(_pngs(part)) == ["000004.png", "000005.png", "000006.png", "000007.png"]
    assert json.loads((part / "relaydiff-sample.json").read_text())["complete"] is False
    # eval refuses the half-made folder; sample without --resume refuses to mix into it
    rc, cap = _run_cli(capsys, "eval", "--images", str(part), "--ref", str(full), "--quiet")
    _one_line_error(rc, cap, "unfinished")
    rc, cap = _run_cli(capsys, *args, "--out", str(part))
    _one_line_error(rc, cap, "--resume")
    # other settings are refused, naming what differs
    rc, cap = _run_cli(capsys, *[a if a != "3,6" else "3,7" for a in args], "--out", str(part), "--resume")
    _one_line_error(rc, cap, "steps differ")
    # --resume makes only the last batch, and the folder equals the uninterrupted run's
    batches.clear()
    assert _run_cli(capsys, *args, "--out", str(part), "--resume")[0] == 0
    assert batches == [4]
    for sub in (".", "low"):
        a, b = _pngs(full / sub), _pngs(part / sub)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), sub
    assert json.loads((part / "relaydiff-sample.json").read_text())["complete"] is True
    rc, cap = _run_cli(capsys, *args[:-1], "--out", str(part), "--resume")
    assert rc == 0 and "nothing to do" in cap.out and batches == [4]


def test_cli_sample_checks_disk_space_first(checkpoints, tmp_path, capsys, monkeypatch):
    import shutil

    from relaydiff.cli import sample as sample_cli
    real = shutil.disk_usage
    monkeypatch.setattr(sample_cli.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000_000))
    out = tmp_path / "out"
    # 100,000 images of 32 x 32 x 3 can take ~0.8 GB (32 * 97 raw bytes + slack each): 10 MB free refuses
    rc, cap = _run_cli(capsys, "sample", "--stage1", checkpoints["base"], "--stage2", checkpoints["relay"],
                       "--out", str(out), "--n", "100000", "--quiet")
    _one_line_error(rc, cap, "GB free")
    assert not out.exists()
    # the bound is an upper bound of the real PNG sizes
    assert sample_cli._png_bound(3, 32, 32) >= 32 * 32 * 3


def test_cli_upscale_per_image_seeds(checkpoints, tmp_path, capsys):
    """``upscale --seeds``: one seed per input (sorted by name); output k depends on input k and
    seed k alone: the same PNGs in any --batch, and image k upscaled alone with its seed gives
    its PNG (which is the pipeline's super_resolve with that seed)."""
    src = tmp_path / "in"
    _write_inputs(src, 8, names=("a", "b", "c", "d", "e"))
    args = ["upscale", "--stage2", checkpoints["relay"], "--in", str(src), "--steps", "8", "--seeds", "5,1,9,3-4",
            "--quiet"]
    for batch in ("2", "5"):
        rc, cap = _run_cli(capsys, *args, "--batch", batch, "--out", str(tmp_path / f"b{batch}"))
        assert rc == 0, cap.err
    two, five = _pngs(tmp_path / "b2"), _pngs(tmp_path / "b5")
    assert sorted(two) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert all(np.array_equal(two[k], five[k]) for k in two)
    assert len({two[k].tobytes() for k in two}) == 5
    pipe = RelayPipeline.from_checkpoints(None, checkpoints["relay"], sampler=FAST)
    for name, seed in (("b", "1"), ("e", "4")):
        alone = tmp_path / f"alone_{name}"
        _write_inputs(alone, 8, names=("a", "b", "c", "d", "e"))
        for other in "abcde":
            if other != name:
                (alone / f"{other}.png").unlink()
        rc, cap = _run_cli(capsys, *[a if a != "5,1,9,3-4" else seed for a in args], "--in", str(alone),
                           "--out", str(tmp_path / f"out_{name}"))
        assert rc == 0, cap.err
        got = np.array(Image.open(tmp_path / f"out_{name}" / f"{name}.png"))
        assert np.array_equal(got, two[f"{name}.png"])
        low = torch.from_numpy(np.array(Image.open(alone / f"{name}.png"))).permute(2, 0, 1)[None].float() / 127.5 - 1
        want = pipe.super_resolve(low, seeds=[int(seed)], steps=8, disable=True)
        assert (torch.from_numpy(got).permute(2, 0, 1).float() / 127.5 - 1 - want[0]).abs().max() <= 1 / 127.5 + 1e-6
    # another seed for image b: another image
    rc, cap = _run_cli(capsys, *[a if a != "5,1,9,3-4" else "6" for a in args], "--in", str(tmp_path / "alone_b"),
                       "--out", str(tmp_path / "b6"))
    assert rc == 0 and not np.array_equal(_pngs(tmp_path / "b6")["b.png"], two["b.png"])
    # one seed per input image, else a one-line error and nothing written
    out = tmp_path / "bad"
    for seeds, needle in (("1-4", "--seeds names 4 seeds for the 5 images"),
                          ("0-5", "--seeds names 6 seeds for the 5 images"), ("2-1", "--seeds must be")):
        rc, cap = _run_cli(capsys, *[a if a != "5,1,9,3-4" else seeds for a in args], "--out", str(out))
        _one_line_error(rc, cap, needle)
        assert not out.exists()
    rc, cap = _run_cli(capsys, *args, "--seed", "3", "--out", str(out))
    _one_line_error(rc, cap, "replaces --seed")
    rc, cap = _run_cli(capsys, *args, "--class", "seed-mod", "--out", str(out))
    _one_line_error(rc, cap, "unconditional")
    assert not out.exists()
