"""relaydiff.diffusion losses, relaydiff.data, relaydiff.training and the `relaydiff train` CLI."""
from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from relaydiff import ops
from relaydiff.cli import main as cli_main
from relaydiff.config import RelayConfig
from relaydiff.data import ImageDataset, InfiniteSampler, float_to_uint8, uint8_to_float
from relaydiff.diffusion import EDMLoss, RelayLoss, drop_labels, loss_weight
from relaydiff.models import load_model
from relaydiff.training import ConfigError, TrainConfig, train
from relaydiff.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_images(root: pathlib.Path, n_per_class: int = 8, size=(20, 24), classes=("red", "blue")) -> pathlib.Path:
    """Smooth two-class images: a colour ramp whose hue depends on the class."""
    rng = np.random.default_rng(0)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            phase = rng.uniform(0, 2 * np.pi)
            ramp = 0.5 + 0.4 * np.sin(xx / 4.0 + yy / 5.0 + phase)
            img = np.stack([ramp if ci == 0 else 1 - ramp, 0.5 * ramp, ramp if ci == 1 else 0.2 * ramp], -1)
            Image.fromarray((img * 255).astype(np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pathlib.Path:
    return make_images(tmp_path_factory.mktemp("data"))


def tiny_cfg(data, out, **kw) -> TrainConfig:
    args = dict(stage="base", data=str(data), out=str(out), preset="tiny", resolution=16, batch=4, steps=4,
                quiet=True, workers=0, log_every=2, checkpoint_every=1000, sample_every=-1, seed=3, device="cpu")
    args.update(kw)
    return TrainConfig(**args)


# ----------------------------------------------------------------------------- losses

class _Echo(torch.nn.Module):
    """A 'denoiser' returning its input: the loss is then ``lambda (x_t - x0)^2``."""

    def forward(self, x, sigma, class_labels=None):
        self.sigma, self.labels = sigma, class_labels
        return x


def test_loss_weight_closed_form():
    s = torch.tensor([0.01, 0.5, 10.0], dtype=torch.float64)
    torch.testing.assert_close(loss_weight(s), (s ** 2 + 0.25) / (s * 0.5) ** 2)


def test_edm_loss_noise_levels_and_weighting():
    torch.manual_seed(0)
    x0 = torch.rand(4096, 1, 2, 2) * 2 - 1
    echo = _Echo()
    loss = EDMLoss()(echo, x0)
    ln_s = echo.sigma.log()
    # ln sigma ~ N(-1.2, 1.2^2): mean within 5 standard errors, std within 5%
    assert abs(ln_s.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(4096)
    assert abs(ln_s.std().item() / 1.2 - 1) < 0.05
    # x_t - x0 = sigma e: the weighted error divided by lambda sigma^2 is e^2 (mean 1)
    e2 = loss / (loss_weight(echo.sigma) * echo.sigma ** 2).reshape(-1, 1, 1, 1)
    assert abs(e2.mean().item() - 1) < 0.05


def test_relay_loss_uses_relay_corrupt_and_truncated_schedule():
    torch.manual_seed(0)
    relay = RelayConfig(alpha=0.5, truncation=0.89)
    x0 = torch.rand(512, 3, 8, 8) * 2 - 1
    calls = {}

    def spy(images, sigma, tau, **kw):
        x_t = ops.relay_corrupt(images, sigma, tau, **kw, seed=7)
        calls.update(sigma=sigma, tau=tau, kw=kw, x_t=x_t)
        return x_t

    echo = _Echo()
    loss = RelayLoss(relay, corrupt=spy)(echo, x0)
    sigma, tau = calls["sigma"], calls["tau"]
    assert calls["kw"] == relay.op_kwargs()
    assert torch.equal(echo.sigma, sigma)
    # truncated schedule: sigma in [sigma_floor, sigma(t=1)], blur from the same t
    assert sigma.min() >= relay.sigma_floor * (1 - 1e-5) and sigma.max() <= relay.sigma_max * (1 + 1e-5)
    assert sigma.max() > 0.8 * relay.sigma_max and sigma.min() < 2 * relay.sigma_floor
    torch.testing.assert_close(tau.double(), relay.tau_of_sigma(sigma.double()), rtol=1e-4, atol=1e-6)
    # the target is the unblurred x0
    torch.testing.assert_close(loss, loss_weight(sigma).reshape(-1, 1, 1, 1) * (calls["x_t"] - x0) ** 2)


def test_label_dropout():
    torch.manual_seed(0)
    labels = torch.nn.functional.one_hot(torch.arange(20000) % 7, 7).float()
    dropped = drop_labels(labels, 0.25)
    zero = (dropped.sum(1) == 0).float().mean().item()
    assert abs(zero - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 20000)
    kept = dropped.sum(1) == 1
    assert torch.equal(dropped[kept], labels[kept])
    assert drop_labels(labels, 0.0) is labels and drop_labels(None, 0.5) is None
    with pytest.raises(ValueError, match="label_dropout"):
        EDMLoss(label_dropout=1.0)


# ----------------------------------------------------------------------------- data

def test_dataset_folder_zip_labels_and_flip(tmp_path, images):
    zpath = tmp_path / "d.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in sorted(images.rglob("*.png")):
            z.write(p, p.relative_to(images).as_posix())
    a = ImageDataset(images, 16, cache=False)
    b = ImageDataset(zpath, 16, cache=True)
    assert a.class_names == b.class_names == ["blue", "red"] and a.label_dim == 2
    assert len(a) == 2 * a.num_images == 32
    for i in (0, 5, 9, 20):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    img, label = a[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
    assert torch.equal(a[3 + a.num_images][0], img.flip(-1)) and a[3 + a.num_images][1] == label
    assert ImageDataset(images, 16, labels=False).label_dim == 0
    assert len(ImageDataset(images, 16, xflip=False)) == 16


def test_dataset_centre_crop(tmp_path):
    arr = np.zeros((32, 48, 3), np.uint8)
    arr[:, :8] = 255                       # left border: cropped away
    arr[:, 8:40] = np.arange(32, dtype=np.uint8)[:, None, None] * 7
    arr[:, 40:] = 100                      # right border: cropped away
    Image.fromarray(arr).save(tmp_path / "x.png")
    img, label = ImageDataset(tmp_path, 32, xflip=False)[0]
    assert label == 0
    assert torch.equal(img, torch.from_numpy(arr[:, 8:40].transpose(2, 0, 1).copy()))


def test_dataset_errors(tmp_path, images):
    with pytest.raises(ValueError, match="does not exist"):
        ImageDataset(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no PNG/JPEG"):
        ImageDataset(tmp_path / "empty", 16)
    with pytest.raises(ValueError, match="smaller than the resolution"):
        ImageDataset(images, 32)
    with pytest.raises(ValueError, match="least two"):
        ImageDataset(images / "red", 16, labels=True)


def test_uint8_float_round_trip():
    u8 = torch.arange(256, dtype=torch.uint8)
    x = uint8_to_float(u8)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(float_to_uint8(x), u8)
    assert torch.equal(float_to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_infinite_sampler_partitions_and_resumes():
    n, world = 10, 3
    streams = [list(itertools.islice(InfiniteSampler(n, r, world, seed=5), 20)) for r in range(world)]
    merged = [streams[k % world][k // world] for k in range(60)]
    for e in range(6):   # every epoch of the global order is a permutation
        assert sorted(merged[e * n:(e + 1) * n]) == list(range(n))
    for r in range(world):
        assert list(itertools.islice(InfiniteSampler(n, r, world, seed=5, start=7), 13)) == streams[r][7:]


# ----------------------------------------------------------------------------- training

def _fixed_loss(net, images) -> float:
    """Weighted denoising error at 8 fixed noise levels with fixed noise (no global RNG use)."""
    g = torch.Generator().manual_seed(123)
    sigmas = torch.exp(torch.linspace(-3.0, 1.5, 8))
    total = 0.0
    with torch.no_grad():
        for s in sigmas:
            sig = torch.full((images.shape[0],), float(s))
            x_t = images + s * torch.randn(images.shape, generator=g)
            total += (loss_weight(sig).reshape(-1, 1, 1, 1) * (net(x_t, sig, None) - images) ** 2).mean().item()
    return total / len(sigmas)


def test_training_decreases_loss(tmp_path, images):
    cfg = tiny_cfg(images, tmp_path / "run", steps=40, batch=8, labels=False, lr=5e-3, log_every=10,
                   ema_halflife_kimg=0.05)
    batch = uint8_to_float(torch.stack([ImageDataset(images, 16, xflip=False)[i][0] for i in range(16)]))
    torch.manual_seed(cfg.seed)
    from relaydiff.models import build_model, network_kwargs
    before = _fixed_loss(build_model(network_kwargs("tiny", 16, label_dim=0)).eval(), batch)
    run = train(cfg)
    model, meta = load_model(run, which="model")
    after = _fixed_loss(model, batch)
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30, 40]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log)
    assert meta["step"] == 40 and meta["kimg"] == pytest.approx(0.32) and meta["label_dim"] == 0
    print(f"fixed-sigma loss before {before:.4f}, after 40 steps {after:.4f}")
    assert after < 0.75 * before, (before, after)   # measured: 1.27 -> 0.72


def _weights(path: pathlib.Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, _, state = load_checkpoint(latest_checkpoint(path))
    return tensors, state


def test_resume_reaches_the_same_weights(tmp_path, images):
    # relay stage, class labels with dropout, accumulation, augmentation: every source of randomness
    kw = dict(stage="relay", resolution=16, batch=4, accum=2, label_dropout=0.5, checkpoint_every=3,
              relay=RelayConfig(blur_sigma_max=2.0), dropout=0.1, augment=0.5)
    train(tiny_cfg(images, tmp_path / "a", steps=6, **kw))
    train(tiny_cfg(images, tmp_path / "b", steps=3, **kw))
    train(tiny_cfg(images, tmp_path / "b", steps=6, resume=True, workers=1, **kw))   # workers: same order
    (ta, sa), (tb, sb) = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert sa["step"] == sb["step"] == 6
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for ka, kb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ka["exp_avg_sq"], kb["exp_avg_sq"])
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6]   # the log of the resumed run continues without repeats


def test_resume_makes_the_preview_grid_a_kill_lost(tmp_path, images):
    kw = dict(checkpoint_every=2, sample_every=2, sample_count=4)
    train(tiny_cfg(images, tmp_path / "a", steps=4, **kw))
    train(tiny_cfg(images, tmp_path / "b", steps=2, **kw))
    grid = tmp_path / "b" / "samples" / "step-0000002.png"
    original = grid.read_bytes()
    grid.unlink()   # as if killed after the step-2 checkpoint, before its grid
    train(tiny_cfg(images, tmp_path / "b", steps=4, resume=True, **kw))
    assert grid.read_bytes() == original   # the same grid (fixed preview inputs, the same weights)
    assert sorted(os.listdir(tmp_path / "b" / "samples")) == sorted(os.listdir(tmp_path / "a" / "samples"))
    (ta, _), (tb, _) = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in ta:   # making it drew nothing from the training's random streams
        assert torch.equal(ta[k], tb[k]), k


def test_checkpoint_minutes_snapshots_a_timed_run(tmp_path, images):
    # 1e-6 minutes: every step is past due, so every step checkpoints (checkpoint_every is far off)
    train(tiny_cfg(images, tmp_path / "a", steps=3, keep=0, checkpoint_minutes=1e-6))
    files = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("*.safetensors"))
    assert len(files) == 3, files
    train(tiny_cfg(images, tmp_path / "b", steps=3, keep=0, checkpoint_minutes=60))
    assert len(list((tmp_path / "b" / "checkpoints").glob("*.safetensors"))) == 1   # the end only
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="checkpoint_minutes must be a positive number"):
            tiny_cfg(images, tmp_path / "c", checkpoint_minutes=bad).resolved()


def test_resume_refuses_other_network_and_existing_run(tmp_path, images):
    train(tiny_cfg(images, tmp_path / "r", steps=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_cfg(images, tmp_path / "r", steps=2))
    with pytest.raises(ConfigError, match="cannot resume"):
        train(tiny_cfg(images, tmp_path / "r", steps=2, resume=True, dropout=0.3))


def test_interrupted_checkpoint_leaves_previous_one(tmp_path, images, monkeypatch):
    run = train(tiny_cfg(images, tmp_path / "r", steps=1))
    first = latest_checkpoint(run)
    tensors, meta, state = load_checkpoint(first)
    model, ema = load_model(run, which="model")[0], load_model(run)[0]

    def crash(obj, f, *a, **k):
        pathlib.Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, 2, model, ema, meta, state)
    assert latest_checkpoint(run) == first
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
    load_model(run)   # still loads


def test_nan_steps_are_skipped(tmp_path, images, monkeypatch):
    import relaydiff.training.loop as loop
    calls = []

    class NaNOnSecond(EDMLoss):
        def __call__(self, net, images, labels=None):
            calls.append(1)
            loss = super().__call__(net, images, labels)
            return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "EDMLoss", NaNOnSecond)
    run = train(tiny_cfg(images, tmp_path / "r", steps=3, log_every=1, checkpoint_every=1, keep=0))
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [0, 1, 1]
    w1, _, _ = load_checkpoint(run / "checkpoints" / "step-0000001.safetensors")
    w2, _, _ = load_checkpoint(run / "checkpoints" / "step-0000002.safetensors")
    for k in w1:
        if k.startswith("model."):
            assert torch.equal(w1[k], w2[k]), k   # the NaN step changed nothing
    assert all(torch.isfinite(v).all() for v in w2.values())


def test_time_budget_stops_and_checkpoints(tmp_path, images):
    run = train(tiny_cfg(images, tmp_path / "r", steps=None, minutes=0.0))
    _, state = _weights(run)
    assert state["step"] == 1


def test_sample_grids_and_bf16(tmp_path, images):
    run = train(tiny_cfg(images, tmp_path / "b", steps=1, sample_every=0, sample_count=4, amp="bfloat16"))
    grid = Image.open(run / "samples" / "step-0000001.png")
    assert grid.size == (32, 32)   # 2 x 2 samples of 16 px
    run = train(tiny_cfg(images, tmp_path / "r", stage="relay", steps=1, sample_every=0, sample_count=3))
    grid = Image.open(run / "samples" / "step-0000001.png")
    assert grid.size == (48, 48)   # rows: low-res condition, samples, real images
    model, meta = load_model(run)
    assert meta["stage"] == "relay" and RelayConfig.from_dict(meta["relay"]) == RelayConfig()
    assert meta["label_dim"] == 2 and model.label_dim == 2


_DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from relaydiff.training import TrainConfig, train
    torch.set_num_threads(1)
    train(TrainConfig(stage="relay", data=sys.argv[1], out=sys.argv[2], preset="tiny", resolution=16, batch=4,
                      steps=3, quiet=True, workers=0, sample_every=-1, log_every=1, label_dropout=0.5,
                      device="cpu"))
""")


def test_ddp_two_gloo_processes(tmp_path, images):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(images), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, state = _weights(tmp_path / "run")
    assert state["world"] == 2 and state["step"] == 3
    sums = state["weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]          # both ranks hold identical weights
    assert state["data_pos"] == [6, 6]                    # 2 images per rank per step
    assert not torch.equal(state["rng"][0], state["rng"][1])   # but draw different noise
    log = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]          # written once, by rank 0


# ----------------------------------------------------------------------------- CLI

def _cli(capsys, *argv) -> tuple[int, str]:
    rc = cli_main(["train", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "empty", "small", "preset", "patch", "relay-flag", "stage", "steps"])
def test_cli_errors(case, tmp_path, images, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    args = {
        "missing": ["--stage", "base", "--data", str(tmp_path / "nope")],
        "empty": ["--stage", "base", "--data", str(tmp_path / "empty")],
        "small": ["--stage", "base", "--data", str(images), "--resolution", "32"],
        "preset": ["--stage", "base", "--data", str(images), "--preset", "huge"],
        "patch": ["--stage", "relay", "--data", str(images), "--resolution", "18", "--preset", "tiny"],
        "relay-flag": ["--stage", "base", "--data", str(images), "--alpha", "0.3"],
        "stage": ["--stage", "middle", "--data", str(images)],
        "steps": ["--stage", "base", "--data", str(images), "--steps", "0"],
    }[case]
    steps = [] if "--steps" in args else ["--steps", "2"]
    rc, err = _cli(capsys, *args, "--out", str(out), *steps, "--quiet")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relaydiff train: error:"), err
    assert not out.exists()


def test_cli_error_messages_name_the_problem(tmp_path, images, capsys):
    rc, err = _cli(capsys, "--stage", "relay", "--data", str(images), "--out", str(tmp_path / "o"),
                   "--resolution", "18", "--steps", "1")
    assert rc == 2 and "multiple of" in err and "18" in err
    rc, err = _cli(capsys, "--stage", "base", "--data", str(images), "--out", str(tmp_path / "o"),
                   "--resolution", "32", "--steps", "1")
    assert rc == 2 and "smaller than the resolution" in err


def test_cli_trains_and_refuses_to_overwrite(tmp_path, images, capsys):
    out = tmp_path / "run"
    common = ["--stage", "base", "--data", str(images), "--out", str(out), "--resolution", "16", "--batch", "2",
              "--workers", "0", "--sample-every", "-1", "--quiet"]
    rc, err = _cli(capsys, *common, "--steps", "1")
    assert rc == 0, err
    assert (out / "checkpoints" / "latest").is_file()
    rc, err = _cli(capsys, *common, "--steps", "2")
    assert rc == 2 and "--resume" in err
    rc, err = _cli(capsys, *common, "--steps", "2", "--resume")
    assert rc == 0, err
    assert load_model(out)[1]["step"] == 2


def test_cli_help_documents_every_option(capsys):
    from relaydiff.cli import build_parser
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sub = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in text
        assert action.help, action.option_strings


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage, amp", [("base", "bfloat16"), ("relay", "float16"), ("relay", None)])
def test_cuda_training(tmp_path, images, stage, amp):
    run = train(tiny_cfg(images, tmp_path / "r", stage=stage, steps=3, amp=amp, device="cuda", sample_every=0,
                         sample_count=2, log_every=1))
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    model, meta = load_model(run, device="cuda")
    x = torch.randn(2, 3, 16, 16, device="cuda")
    y = model(x, torch.tensor([0.5, 1.0], device="cuda"), torch.eye(2, device="cuda"))
    assert torch.isfinite(y).all() and (run / "samples" / "step-0000003.png").is_file()


# ----------------------------------------------------------------------------- crops

def test_random_crop_windows_are_aligned_sub_images():
    from relaydiff.training.loop import random_crop
    torch.manual_seed(0)
    images = torch.arange(6 * 3 * 16 * 16, dtype=torch.float32).reshape(6, 3, 16, 16)
    crops = random_crop(images, 8, align=4)
    assert crops.shape == (6, 3, 8, 8)
    corners = set()
    for img, crop in zip(images, crops):
        (y, x), = [(y, x) for y in range(0, 9, 4) for x in range(0, 9, 4)
                   if torch.equal(img[:, y:y + 8, x:x + 8], crop)]
        corners.add((y, x))
    assert len(corners) > 1                              # windows differ between images
    torch.manual_seed(0)
    assert torch.equal(random_crop(images, 8, align=4), crops)   # the global generator seeds it


def test_crop_option(images, tmp_path):
    """A relay stage trained on 8 px crops of 16 px images: the checkpoint is a 16 px model."""
    relay = RelayConfig(patch_size=2, block_size=2)
    cfg = tiny_cfg(images, tmp_path / "run", stage="relay", crop=8, relay=relay, steps=2)
    assert cfg.resolved().crop == 8
    model, meta = load_model(train(cfg))
    assert meta["resolution"] == 16 and model.img_resolution == 16
    assert json.loads((tmp_path / "run" / "config.json").read_text())["crop"] == 8
    for bad, msg in ((10, "multiple of 4"), (32, "at most the resolution"), (0, "positive")):
        with pytest.raises(ConfigError, match=msg):
            tiny_cfg(images, tmp_path / "x", stage="relay", crop=bad, relay=relay).resolved()
    with pytest.raises(ConfigError, match="patch size"):
        tiny_cfg(images, tmp_path / "x", stage="relay", resolution=32, crop=4,
                 relay=RelayConfig(patch_size=8, block_size=4)).resolved()
    # the short-run relay preset brings its crop, batch and truncation; an explicit crop wins
    c = TrainConfig(stage="relay", data=str(images), out=str(tmp_path / "y"), preset="tiny-relay", steps=1).resolved()
    assert (c.crop, c.batch, c.resolution, c.relay.truncation) == (32, 16, 64, 0.15)
    assert TrainConfig(stage="relay", data=str(images), out=str(tmp_path / "y"), preset="tiny-relay", steps=1,
                       crop=64).resolved().crop == 64
