"""Files handed to a loader: no code runs, no allocation beyond what the file's tensors hold,
no trust in names a run directory holds; and no silent data loss in image decoding."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import pathlib
import re
import struct
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



@contextlib.contextmanager
def traced_peak():
    """The peak of what Python allocated inside the block (``tracemalloc``), in ``mem["peak"]``
    once the block has ended (also when it raised)."""
    mem = {}
    tracemalloc.start()
    try:
        yield mem
    finally:
        mem["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

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
    with traced_peak() as mem, open_checkpoint(bomb) as (_, top), \
            pytest.raises(Exception, match="67108864 bytes, 64 expected"):
        top["w"].load()
    assert mem["peak"] < 8 << 20, mem


def test_a_view_reads_only_its_span_of_the_storage(tmp_path):
    big = torch.arange(1 << 20, dtype=torch.float32)
    torch.save({"v": big[1000:1008:2]}, tmp_path / "v.pt")   # torch.save keeps the whole 4 MiB storage
    with traced_peak() as mem, open_checkpoint(tmp_path / "v.pt") as (_, top):
        v = top["v"].load()
    assert torch.equal(v, big[1000:1008:2]) and mem["peak"] < 1 << 20, mem


def _replace_member(src: pathlib.Path, dst: pathlib.Path, suffix: str, data: bytes) -> None:
    """A copy of the zip ``src`` with the member whose name ends in ``suffix`` replaced by ``data``, deflated."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            if info.filename.endswith(suffix):
                b.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                b.writestr(info, a.read(info))


def _shared_stream_zip(path: pathlib.Path, data: bytes, copies: int) -> None:
    """A zip whose directory lists one deflated stream ``copies`` times under other names: each
    member is plausible on its own, together they inflate to far more than the file."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("s/data/00", data)
    raw = path.read_bytes()
    cd, end = raw.index(b"PK\x01\x02"), raw.index(b"PK\x05\x06")
    entries = b"".join(raw[cd:end].replace(b"s/data/00", f"s/data/{i:02d}".encode()) for i in range(copies))
    eocd = bytearray(raw[end:])
    struct.pack_into("<HHII", eocd, 8, copies, copies, len(entries), cd)
    path.write_bytes(raw[:cd] + entries + bytes(eocd))


def test_pickle_member_size_is_checked_before_it_is_inflated(tmp_path):
    from relaydiff.metrics import load_inception
    from relaydiff.models import convert_release
    from relaydiff.models import safe_pickle
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(16, dtype=torch.float32)}, path)
    with open_checkpoint(path) as (_, top):
        assert torch.equal(top["w"].load(), torch.arange(16, dtype=torch.float32))
    # data.pkl replaced by a pickle of one bytes object just over the cap (zeros, deflated: 64 KiB on disk);
    # read, it would hold all of it in memory
    n = safe_pickle.MAX_PICKLE_BYTES
    bomb = tmp_path / "bomb.pt"
    _replace_member(path, bomb, "/data.pkl", b"\x80\x04\x8e" + struct.pack("<Q", n) + bytes(n) + b".")
    assert bomb.stat().st_size < 1 << 20
    for load in (lambda p: open_checkpoint(p).__enter__(), lambda p: convert_release(p, stage="base"),
                 load_inception):
        with traced_peak() as mem, \
                pytest.raises(Exception, match=f"data.pkl declares {n + 12} bytes inflated, more than the {n}"):
            load(bomb)
        assert mem["peak"] < 8 << 20, mem


def test_resume_checks_the_state_files_zip_directory_before_torch_load(tmp_path, monkeypatch):
    from relaydiff.training.checkpoint import load_checkpoint
    weights, _ = _tiny_weights(tmp_path / "step-0000001.safetensors")
    state = tmp_path / "step-0000001.state.pt"
    torch.save({"step": 3, "rng": torch.arange(1000)}, state)
    assert load_checkpoint(weights)[2]["step"] == 3
    bomb = tmp_path / "bomb.pt"
    _replace_member(state, bomb, "/data/0", bytes(64 << 20))   # 64 MiB of zeros in 64 KiB
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was reached"))
    noise = np.random.default_rng(0).integers(0, 4, 1 << 16, dtype=np.uint8).tobytes()   # deflates about 3:1
    for name, write in [
            ("inflates", lambda p: p.write_bytes(bomb.read_bytes())),
            ("shared", lambda p: _shared_stream_zip(p, noise, 40)),
            ("pickle", lambda p: p.write_bytes(b"\x80\x02}q\x00."))]:
        write(state)
        with pytest.raises(ValueError, match=re.escape(str(state)) + " is not a training state") as e:
            load_checkpoint(weights)
        assert "\n" not in str(e.value)
        if name == "inflates":
            assert "declares 67108864 bytes inflated from" in str(e.value)
        if name == "shared":
            assert "its members declare" in str(e.value)


def test_declared_sizes_a_member_cannot_hold_are_refused():
    from relaydiff.zipsizes import DeclaredSizeError, check_member
    info = zipfile.ZipInfo("m")
    info.compress_type, info.compress_size, info.file_size = zipfile.ZIP_STORED, 100, 100
    check_member(info, size=100, limit=100)
    info.file_size = 10 ** 12   # a stored member inflates to exactly what it stores
    with pytest.raises(DeclaredSizeError, match="declares 1000000000000 bytes but stores 100"):
        check_member(info)
    info.compress_type = zipfile.ZIP_DEFLATED   # and deflate cannot do better than 1032:1
    with pytest.raises(DeclaredSizeError, match="1032:1"):
        check_member(info)
    info.file_size = 1032 * 100
    check_member(info)
    with pytest.raises(DeclaredSizeError, match="more than the 1000 allowed"):
        check_member(info, limit=1000)


def _npy(arr: np.ndarray | None = None, header: dict | None = None, data: bytes = b"") -> bytes:
    """An .npy file: ``arr`` saved, or a bare ``header`` (shape, descr) followed by ``data``."""
    buf = io.BytesIO()
    if arr is not None:
        np.save(buf, arr)
    else:
        np.lib.format.write_array_header_1_0(buf, {"fortran_order": False, **header})
        buf.write(data)
    return buf.getvalue()


def _npz(path: pathlib.Path, members: dict[str, bytes], flip: str | None = None) -> str:
    """A stored zip of ``.npy`` members; ``flip`` names one whose last data byte is flipped (its CRC then fails)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)
    if flip is not None:
        raw = bytearray(path.read_bytes())
        raw[raw.index(members[flip]) + len(members[flip]) - 1] ^= 0xFF
        path.write_bytes(bytes(raw))
    return str(path)


def test_stats_npz_corrupt_or_declaring_too_much_is_a_value_error(tmp_path):
    from relaydiff.metrics import load_stats
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    good = _npz(tmp_path / "good.npz", {"mu": _npy(mu), "sigma": _npy(sigma), "n": _npy(np.int64(7))})
    s = load_stats(good)
    np.testing.assert_array_equal(s.mu, mu)
    np.testing.assert_array_equal(s.sigma, sigma)
    assert s.n == 7
    bad = _npz(tmp_path / "bad.npz", {"mu": _npy(mu), "sigma": _npy(sigma)}, flip="sigma")
    with pytest.raises(ValueError, match=r"bad\.npz.*CRC"):
        load_stats(bad)
    # headers that declare far more than their member holds: refused before numpy allocates
    for name, shape in (("huge", (10 ** 11,)), ("big", (8 << 20,))):   # 745 GiB; 64 MiB
        path = _npz(tmp_path / f"{name}.npz", {"mu": _npy(header={"shape": shape, "descr": "<f8"}, data=bytes(64)),
                                               "sigma": _npy(sigma)})
        with traced_peak() as mem, \
                pytest.raises(ValueError, match=rf"{name}\.npz.*declares a float64 array of shape \[{shape[0]}\]"):
            load_stats(path)
        assert mem["peak"] < 8 << 20, mem
    odd_n = _npz(tmp_path / "odd_n.npz", {"mu": _npy(mu), "sigma": _npy(sigma), "n": _npy(np.arange(3))})
    with pytest.raises(ValueError, match="'n' must be one integer"):
        load_stats(odd_n)


def test_npz_images_corrupt_or_declaring_too_much_are_clean_errors(tmp_path):
    from relaydiff.images import ImageError
    from relaydiff.metrics import open_images
    arr = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)   # 12 KiB: read in chunks
    good = open_images(_npz(tmp_path / "good.npz", {"arr_0": _npy(arr)}))
    np.testing.assert_array_equal(torch.cat(list(good.batches(3))).permute(0, 2, 3, 1).numpy(), arr)
    bad = open_images(_npz(tmp_path / "bad.npz", {"arr_0": _npy(arr)}, flip="arr_0"))   # the header reads fine
    with pytest.raises(ImageError, match=r"bad\.npz: corrupt arr_0\.npy .*CRC"):
        list(bad.batches(3))
    big = _npz(tmp_path / "big.npz", {"arr_0": _npy(header={"shape": (10 ** 9, 32, 32, 3), "descr": "|u1"},
                                                    data=arr.tobytes())})
    with pytest.raises(ValueError, match=r"big\.npz.*declares a uint8 array of shape \[1000000000, 32, 32, 3\]"):
        open_images(big)


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

# the CUDA case carries the ``cuda`` marker: bench/gpu_check.sh runs ``-m cuda``; conftest skips it without a GPU
OPS_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


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
        fused = ops.relay_step(xt, x, sig, sig * 0.5, 0.5, 0.25) + ops.mixed_noise(x, alpha=0.3, normalize=False)
        # CogView3's linear blur (pure PyTorch around mixed_noise), heun and a step without noise:
        # eagerly that one still draws (and ignores) a seed, so the block noise after it shows
        # whether the compiled step drew one too
        lin = ops.linear_relay_corrupt(x, sig, 0.5)
        lin = ops.linear_relay_step(lin, x, sig, sig * 0.5, 0.5, 0.25, x_prop=x, denoised_prop=lin)
        quiet = ops.linear_relay_step(lin, x, sig, sig * 0.5, 0.25, 0.0, s_noise=0.0)
        return fused, lin, quiet, ops.block_noise(x)

    x = torch.randn(2, 3, 8, 8, device=device)
    compiled = torch.compile(f, fullgraph=True)
    torch.manual_seed(11)
    want = [f(x), f(x)]
    torch.manual_seed(11)
    got = [compiled(x), compiled(x)]
    for g, w in zip(got, want):
        # the same drawn seeds: identical values from the kernels; the linear ops' arithmetic is
        # fused and reordered by inductor (float32 rounding, ~1e-7), a different seed is O(1) off
        for i in (0, 3):
            torch.testing.assert_close(g[i], w[i], rtol=0, atol=0)
        for i in (1, 2):
            torch.testing.assert_close(g[i], w[i], rtol=1e-5, atol=1e-5)
    for i in (0, 1, 2, 3):   # and a fresh seed per call
        assert (got[0][i] - got[1][i]).abs().max() > 0.1, i


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


# ------------------------------------------------------------------ direct op calls: shapes and devices
# Every torch.ops.relaydiff op (the compiled ones and the *_drawn ones of torch.compile) called
# directly, bypassing the Python checks, with a wrong shape or a meta tensor among real ones:
# each must raise a RuntimeError naming the problem before it touches data (the C++ glue,
# csrc/common/checks.h, or the fake kernel the dispatcher picks once any argument is on the
# meta device), never return a tensor of uninitialised memory. The valid calls beside them
# show that the same calls do reach a kernel. In a child process: a crash fails the test with
# the case it died in instead of killing pytest.
_DIRECT_SHAPE_DEVICE_CHILD = r'''
import json, sys
import torch
import relaydiff.ops
O = torch.ops.relaydiff
D = sys.argv[1]
M = "meta"
x = torch.randn(2, 3, 8, 8, device=D)
xm = x.to(M)
odd = torch.randn(1, 1, 6, 8, device=D)     # H = 6: not a multiple of 4, smaller than block_size 7
flat = torch.randn(3, 8, 8, device=D)
ps = torch.full((2,), 0.5, dtype=torch.float64, device=D)
ps1 = ps[:1]
pm = ps.to(M)
noise = (0.15, 4, 1e-3, True)               # alpha, block_size, min_scale, normalize
def corrupt(img, sigma, tau, op=O.relay_corrupt, seed=(1,)):
    return op(img, sigma, tau, 4, noise[0], noise[1], noise[2], noise[3], *seed)
def step(img, den, xp=None, dp=None, sig=ps, sig_n=ps, tau=ps, tau_n=ps, op=O.relay_step, seed=(1,)):
    return op(img, den, xp, dp, sig, sig_n, tau, tau_n, 0.2, 4, *noise, *seed)
REFUSED = {
    "patch_dct odd H": ("multiples of patch_size", lambda: O.patch_dct(odd, 4)),
    "patch_dct 3-D": ("4-D", lambda: O.patch_dct(flat, 4)),
    "patch_dct patch 3": ("patch_size must be", lambda: O.patch_dct(x, 3)),
    "patch_dct meta odd H": ("multiples of patch_size", lambda: O.patch_dct(odd.to(M), 4)),
    "patch_idct odd H": ("multiples of patch_size", lambda: O.patch_idct(odd, 4)),
    "patch_idct meta odd H": ("multiples of patch_size", lambda: O.patch_idct(odd.to(M), 4)),
    "patch_blur odd H": ("multiples of patch_size", lambda: O.patch_blur(odd, ps1, 4, 1e-3)),
    "patch_blur tau meta": ("tau is on meta", lambda: O.patch_blur(x, pm, 4, 1e-3)),
    "patch_blur x meta": ("tau is on " + D, lambda: O.patch_blur(xm, ps, 4, 1e-3)),
    "patch_blur tau [1]": ("tau must have shape", lambda: O.patch_blur(x, ps1, 4, 1e-3)),
    "block_noise 3-D": ("4-D", lambda: O.block_noise(flat, 4, 1)),
    "block_noise block > H": ("block_size", lambda: O.block_noise(odd, 7, 1)),
    "block_noise meta block > H": ("block_size", lambda: O.block_noise(odd.to(M), 7, 1)),
    "mixed_noise 3-D": ("4-D", lambda: O.mixed_noise(flat, 0.15, 4, True, 1)),
    "mixed_noise block > H": ("block_size", lambda: O.mixed_noise(odd, 0.15, 7, True, 1)),
    "mixed_noise meta alpha < 0": ("alpha", lambda: O.mixed_noise(xm, -1.0, 4, True, 1)),
    "relay_corrupt odd H": ("multiples of patch_size", lambda: corrupt(odd, ps1, ps1)),
    "relay_corrupt sigma meta": ("sigma is on meta", lambda: corrupt(x, pm, ps)),
    "relay_corrupt tau meta": ("tau is on meta", lambda: corrupt(x, ps, pm)),
    "relay_corrupt x0 meta": ("sigma is on " + D, lambda: corrupt(xm, ps, ps)),
    "relay_step odd H": ("multiples of patch_size", lambda: step(odd, odd, sig=ps1, sig_n=ps1, tau=ps1, tau_n=ps1)),
    "relay_step denoised meta": ("denoised is on meta", lambda: step(x, xm)),
    "relay_step denoised shape": ("denoised", lambda: step(x, x[:, :, :4])),
    "relay_step x_prop meta": ("x_prop is on meta", lambda: step(x, x, xm, x)),
    "relay_step denoised_prop meta": ("denoised_prop is on meta", lambda: step(x, x, x, xm)),
    "relay_step x_prop alone": ("x_prop and denoised_prop", lambda: step(x, x, x, None)),
    "relay_step sigma_next meta": ("sigma_next is on meta", lambda: step(x, x, sig_n=pm)),
    "relay_step tau_next meta": ("tau_next is on meta", lambda: step(x, x, tau_n=pm)),
    "block_noise_drawn block > H": ("block_size", lambda: O.block_noise_drawn(odd, 7)),
    "block_noise_drawn meta block > H": ("block_size", lambda: O.block_noise_drawn(odd.to(M), 7)),
    "mixed_noise_drawn 3-D": ("4-D", lambda: O.mixed_noise_drawn(flat, 0.15, 4, True)),
    "mixed_noise_drawn meta alpha < 0": ("alpha", lambda: O.mixed_noise_drawn(xm, -1.0, 4, True)),
    "relay_corrupt_drawn odd H": ("multiples of patch_size",
                                  lambda: corrupt(odd, ps1, ps1, O.relay_corrupt_drawn, ())),
    "relay_corrupt_drawn sigma meta": ("sigma is on meta", lambda: corrupt(x, pm, ps, O.relay_corrupt_drawn, ())),
    "relay_step_drawn odd H": ("multiples of patch_size", lambda: step(odd, odd, sig=ps1, sig_n=ps1, tau=ps1,
                                                                   tau_n=ps1, op=O.relay_step_drawn, seed=())),
    "relay_step_drawn denoised meta": ("denoised is on meta", lambda: step(x, xm, op=O.relay_step_drawn, seed=())),
    "relay_step_drawn tau_next meta": ("tau_next is on meta",
                                       lambda: step(x, x, tau_n=pm, op=O.relay_step_drawn, seed=())),
}
if D != "cpu":   # a CPU tensor among the device's (the dispatcher picks the device's kernel)
    c, pc = x.cpu(), ps.cpu()
    REFUSED.update({
        "patch_blur x on cpu": ("x is on cpu", lambda: O.patch_blur(c, ps, 4, 1e-3)),
        "relay_corrupt sigma on cpu": ("sigma is on cpu", lambda: corrupt(x, pc, ps)),
        "relay_step denoised on cpu": ("denoised is on cpu", lambda: step(x, c)),
        "relay_step denoised_prop on cpu": ("denoised_prop is on cpu", lambda: step(x, x, x, c)),
        "relay_step sigma_next on cpu": ("sigma_next is on cpu", lambda: step(x, x, sig_n=pc)),
        "relay_step tau_next on cpu": ("tau_next is on cpu", lambda: step(x, x, tau_n=pc)),
        "relay_step_drawn tau on cpu": ("tau is on cpu", lambda: step(x, x, tau=pc, op=O.relay_step_drawn, seed=())),
    })
VALID = {   # name: (device of the output, call); all of shape [2, 3, 8, 8]
    "patch_dct": (D, lambda: O.patch_dct(x, 4)),
    "patch_idct meta": (M, lambda: O.patch_idct(xm, 4)),
    "patch_blur": (D, lambda: O.patch_blur(x, ps, 4, 1e-3)),
    "block_noise meta": (M, lambda: O.block_noise(xm, 4, 1)),
    "mixed_noise": (D, lambda: O.mixed_noise(x, 0.15, 4, True, 1)),
    "relay_corrupt meta": (M, lambda: corrupt(xm, pm, pm)),
    "relay_step heun": (D, lambda: step(x, x, x, x)),
    "relay_step meta": (M, lambda: step(xm, xm, sig=pm, sig_n=pm, tau=pm, tau_n=pm)),
    "block_noise_drawn": (D, lambda: O.block_noise_drawn(x, 4)),
    "mixed_noise_drawn meta": (M, lambda: O.mixed_noise_drawn(xm, 0.15, 4, True)),
    "relay_corrupt_drawn": (D, lambda: corrupt(x, ps, ps, O.relay_corrupt_drawn, ())),
    "relay_step_drawn meta": (M, lambda: step(xm, xm, sig=pm, sig_n=pm, tau=pm, tau_n=pm, op=O.relay_step_drawn,
                                               seed=())),
}
for kind, table in (("refused", REFUSED), ("valid", VALID)):
    for name, (want, call) in table.items():
        print(json.dumps({"start": name}), flush=True)
        try:
            out = call()
            rec = {"returned": [out.device.type, list(out.shape)]}
        except Exception as e:
            rec = {"raised": type(e).__name__, "msg": str(e).splitlines()[0][:300]}
        print(json.dumps(dict(rec, name=name, kind=kind, want=want)), flush=True)
if D != "cpu":
    torch.cuda.synchronize()
print(json.dumps({"done": len(REFUSED) + len(VALID)}), flush=True)
'''


def _check_direct_shape_device_calls(device: str) -> None:
    import os
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _DIRECT_SHAPE_DEVICE_CHILD, device],
                          capture_output=True, text=True, env=env, timeout=300)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [r["start"] for r in records if "start" in r]
    assert proc.returncode == 0 and records and "done" in records[-1], (
        f"the child died (status {proc.returncode}) in {started[-1] if started else None!r}:\n{proc.stderr[-3000:]}")
    results = [r for r in records if "kind" in r]
    assert len(results) == records[-1]["done"] and len(results) >= 45
    wrong = []
    for r in results:
        if r["kind"] == "refused":
            ok = r.get("raised") == "RuntimeError" and r["want"] in r["msg"]
        else:
            ok = r.get("returned") == [r["want"], [2, 3, 8, 8]]
        if not ok:
            wrong.append(r)
    assert not wrong, wrong


def test_direct_op_calls_check_shapes_and_devices_first():
    from relaydiff.ops import _ext
    if not _ext.has_kernel("cpu"):
        pytest.skip("relaydiff._C is not built: there are no direct ops")
    _check_direct_shape_device_calls("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_direct_op_calls_check_shapes_and_devices_first_cuda():
    """The same on CUDA, plus a CPU tensor among CUDA ones for every kind of argument."""
    from relaydiff.ops import _ext
    if not _ext.has_kernel("cuda"):
        pytest.skip(f"relaydiff._C has no CUDA kernels (backend: {_ext.backend()})")
    _check_direct_shape_device_calls("cuda")
