"""Files handed to a loader: no code runs, no allocation beyond what the file's tensors hold,
no trust in names a run directory holds; and no silent data loss in image decoding."""
from __future__ import annotations

import copy
import io
import json
import pathlib
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from relaydiff.models import checkpoint as checkpoint_module
from relaydiff.models import load_model, network_kwargs, save_weights
from relaydiff.models.checkpoint import atomic_write, read_latest
from relaydiff.models.presets import build_model
from relaydiff.models.safe_pickle import open_checkpoint


def _meta_only(*args, **kwargs):
    model = build_model(*args, **kwargs)
    if not next(model.parameters()).is_meta:
        raise AssertionError("a real model was built before the file's tensors were checked")
    return model


def _tiny_weights(path, **network_overrides):
    """A relaydiff weight file of the tiny preset whose metadata may declare another network."""
    net = network_kwargs("tiny", 16)
    torch.manual_seed(0)
    model = build_model(net)
    meta = {"stage": "base", "network": {**net, **network_overrides}, "precond": model.config(), "relay": None,
            "step": 0, "kimg": 0.0, "resolution": 16, "label_dim": 0}
    save_weights(path, {f"ema.{k}": v for k, v in model.state_dict().items()}, meta)
    return path, model


# ------------------------------------------------------------------ declared size vs. the file

def test_load_model_checks_declared_network_before_building(tmp_path, monkeypatch):
    path, model = _tiny_weights(tmp_path / "ok.safetensors")
    loaded, _ = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # the same tensors under metadata that declare a 512-channel network: refused unbuilt
    big, _ = _tiny_weights(tmp_path / "big.safetensors", model_channels=512)
    monkeypatch.setattr(checkpoint_module, "build_model", _meta_only)
    with pytest.raises(ValueError, match="big.safetensors.*do not fit.*mis-shaped"):
        load_model(big)
    deep, _ = _tiny_weights(tmp_path / "deep.safetensors", num_blocks=10 ** 9)
    with pytest.raises(ValueError, match="deep.safetensors.*holds only"):
        load_model(deep)
    odd, _ = _tiny_weights(tmp_path / "odd.safetensors", model_channels="many")
    with pytest.raises(ValueError, match="odd.safetensors.*cannot be built"):
        load_model(odd)


def test_zip_member_size_is_checked_before_it_is_inflated(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(16, dtype=torch.float32)}, path)
    with open_checkpoint(path) as (kind, top):
        assert kind == "torch-zip" and torch.equal(top["w"].load(), torch.arange(16, dtype=torch.float32))
    # the same file with the storage member replaced by 64 MiB of deflated zeros (64 KiB on disk)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                dst.writestr(info.filename, bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, src.read(info))
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with open_checkpoint(bomb) as (_, top), pytest.raises(Exception, match="67108864 bytes in the file, 64 in"):
            top["w"].load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_a_view_reads_only_its_span_of_the_storage(tmp_path):
    big = torch.arange(1 << 20, dtype=torch.float32)
    torch.save({"v": big[1000:1008:2]}, tmp_path / "v.pt")   # torch.save keeps the whole 4 MiB storage
    tracemalloc.start()
    try:
        with open_checkpoint(tmp_path / "v.pt") as (_, top):
            v = top["v"].load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert torch.equal(v, big[1000:1008:2]) and peak < 1 << 20, peak


# ------------------------------------------------------------------ run directories

def test_latest_must_name_a_file_beside_it(tmp_path):
    path, _ = _tiny_weights(tmp_path / "run" / "checkpoints" / "step-0000001.safetensors")
    d = path.parent
    (d / "latest").write_text(path.name + "\n")
    assert read_latest(d) == path and load_model(tmp_path / "run")[1]["stage"] == "base"
    outside, _ = _tiny_weights(tmp_path / "outside.safetensors")
    for name in (str(outside), "../../outside.safetensors", "..", "sub/x.safetensors", "", "\xff"):
        (d / "latest").write_bytes(name.encode("latin-1"))
        with pytest.raises(ValueError, match="latest names"):
            load_model(tmp_path / "run")


def test_atomic_write_leaves_no_temporary_and_checkpoints_sweep_dead_ones(tmp_path):
    from relaydiff.training.checkpoint import save_checkpoint
    def fails(tmp):
        pathlib.Path(tmp).write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.bin", fails)
    assert list(tmp_path.iterdir()) == []
    d = tmp_path / "run" / "checkpoints"
    d.mkdir(parents=True)
    dead = d / ".step-0000001.safetensors.abc123.tmp"   # what a kill -9 mid-write leaves
    dead.write_bytes(b"partial")
    model = build_model(network_kwargs("tiny", 16))
    save_checkpoint(tmp_path / "run", 2, model, copy.deepcopy(model), {"stage": "base", "network": network_kwargs("tiny", 16),
                                                        "precond": model.config()}, {"step": 2})
    assert not dead.exists() and not list(d.glob("*.tmp"))
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step-0000002.safetensors", "step-0000002.state.pt"]


def test_atomic_write_syncs_the_data_and_the_rename(tmp_path, monkeypatch):
    import os
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    atomic_write(tmp_path / "a.bin", lambda tmp: pathlib.Path(tmp).write_bytes(b"data"))
    assert (tmp_path / "a.bin").read_bytes() == b"data"
    # the temporary file before the rename, then the folder holding the new name
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path), synced


# ------------------------------------------------------------------ image decoding

def _grey16(path, size=16):
    """A 16-bit grey PNG: a ramp over the whole 0..65535 range (mode I;16)."""
    v = np.linspace(0, 65535, size * size).round().astype(np.uint16).reshape(size, size)
    Image.fromarray(v).save(path)
    assert Image.open(path).mode == "I;16"
    return v


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    from relaydiff.data import ImageDataset
    from relaydiff.images import load_image
    from relaydiff.metrics import open_images
    (tmp_path / "d").mkdir()
    v = _grey16(tmp_path / "d" / "a.png")
    want = np.clip(np.rint(v.astype(np.float64) * 255 / 65535), 0, 255).astype(np.uint8)   # float64 oracle
    assert want.min() == 0 and want.max() == 255 and len(np.unique(want)) > 200
    grey = load_image(str(tmp_path / "d" / "a.png"), channels=1)
    np.testing.assert_array_equal(grey[:, :, 0], want)
    rgb = load_image(str(tmp_path / "d" / "a.png"))
    np.testing.assert_array_equal(rgb, np.repeat(want[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(open_images(str(tmp_path / "d")).read(0), rgb)
    item, _ = ImageDataset(tmp_path / "d", 16, xflip=False)[0]
    np.testing.assert_array_equal(item.numpy(), np.repeat(want[None], 3, axis=0))


def test_eval_reads_only_what_a_sample_folder_lists(tmp_path):
    from relaydiff.images import write_sample_manifest
    from relaydiff.metrics import open_images
    d = tmp_path / "samples"
    (d / "low").mkdir(parents=True)
    for name in ("000000.png", "000001.png", "low/000000.png", "grid.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / name)
    assert sorted(open_images(str(d)).names) == ["000000.png", "000001.png", "grid.png", "low/000000.png"]
    write_sample_manifest(str(d), ["000000.png", "000001.png"], grid="grid.png", low="low")
    assert open_images(str(d)).names == ["000000.png", "000001.png"]
    write_sample_manifest(str(d), ["../outside.png"])
    with pytest.raises(ValueError, match="relaydiff-sample.json"):
        open_images(str(d))
    (d / "relaydiff-sample.json").write_text("[" * 100000)
    with pytest.raises(ValueError, match="malformed"):
        open_images(str(d))


# ------------------------------------------------------------------ ops: autograd, compile, limits

OPS_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("heun", [False, True])
def test_relay_step_gradient_equals_the_twins(heun):
    from relaydiff import ops
    from relaydiff.ops import reference
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g) for _ in range(4)]
    sigma, sigma_next = torch.tensor([1.0, 0.7], dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64)
    weight = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    grads = []
    for impl in (ops.relay_step, reference.relay_step):   # the twin: plain PyTorch autograd
        leaves = [t.clone().requires_grad_() for t in imgs]
        extra = dict(x_prop=leaves[2], denoised_prop=leaves[3]) if heun else {}
        (impl(leaves[0], leaves[1], sigma, sigma_next, 0.5, 0.3, seed=3, **extra) * weight).sum().backward()
        grads.append([t.grad for t in leaves[:4 if heun else 2]])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    x = imgs[0].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.relay_step(t, imgs[1], sigma, sigma_next, 0.5, 0.3, seed=3), (x,))


@pytest.mark.parametrize("device", OPS_DEVICES)
def test_compile_fullgraph_with_drawn_seeds_equals_eager(device):
    from relaydiff import ops

    def f(x):   # every noise op with seed=None, two calls of one op among them
        sig = torch.full((x.shape[0],), 0.8, dtype=torch.float64, device=x.device)
        xt = ops.relay_corrupt(x, sig, 0.5) + ops.block_noise(x) + ops.block_noise(x)
        return ops.relay_step(xt, x, sig, sig * 0.5, 0.5, 0.25) + ops.mixed_noise(x, alpha=0.3, normalize=False)

    x = torch.randn(2, 3, 8, 8, device=device)
    compiled = torch.compile(f, fullgraph=True)
    torch.manual_seed(11)
    want = [f(x), f(x)]
    torch.manual_seed(11)
    got = [compiled(x), compiled(x)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)   # the same drawn seeds: identical values
    assert not torch.equal(got[0], got[1])   # and a fresh seed per call


def test_value_limits_and_step_direction():
    from relaydiff import ops
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="sigma_next must not exceed sigma"):
        ops.relay_step(x, x, 0.5, 0.6, 0.2, 0.1, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        ops.mixed_noise(x, alpha=1e40, seed=0)
    with pytest.raises(ValueError, match="sigma must be finite and non-negative and at most"):
        ops.relay_corrupt(x, 1e308, 0.2, seed=0)
    with pytest.raises(ValueError, match="tau"):
        ops.blur_factors(float("inf"))
    # at the limits every output is finite
    out = ops.relay_corrupt(torch.ones(1, 1, 8, 8), 1e15, 0.2, alpha=1e15, normalize=False, seed=0)
    assert torch.isfinite(out).all()
    # the meta device: shapes only, no value checks that need data
    meta = torch.empty(2, 3, 8, 8, device="meta")
    assert ops.relay_corrupt(meta, 1.0, 0.5).shape == meta.shape
    assert ops.relay_step(meta, meta, 1.0, 0.5, 0.5, 0.2).device.type == "meta"
