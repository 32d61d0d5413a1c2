"""Fuzzing the public surface with bad input (docs/CONTRACTS.md; README "Command line").

* The ops, through ``relaydiff.ops`` and ``torch.ops.relaydiff.*`` directly: property-based
  cases (``hypothesis``) over ranks, sizes, dtypes, devices (incl. meta), strides, patch and
  block sizes and sigma/tau values (incl. NaN, inf, denormal, huge). Each case either raises a
  clean exception (``ValueError``/``TypeError``/``RuntimeError``) whose message names the
  offending argument, or returns what the reference twin (``relaydiff.ops.reference``) returns.
  Direct ``torch.ops`` calls bypass the Python checks, so they run in a child process in
  batches: a crash of the C++ glue fails the test instead of killing pytest.
* The command line: a table of user mistakes, one or more per subcommand, each of which must
  end with exactly one line on stderr, exit status 2, and no file written.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import re
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from relaydiff.cli import main
from relaydiff.config import RelayConfig
from relaydiff.models import build_model, network_kwargs, save_weights
from test_hardening import _npy, _npz   # .npy / .npz builders (tests/ is on sys.path under pytest)


# ============================================================================ the ops

ARG_NAMES = ("x", "u", "like", "x0", "denoised", "x_prop", "denoised_prop", "sigma", "sigma_next", "tau",
             "tau_next", "patch_size", "block_size", "alpha", "min_scale", "s_noise", "normalize", "seed", "images")
_NAMED = re.compile(r"\b(" + "|".join(ARG_NAMES) + r")\b")
CLEAN = (ValueError, TypeError, RuntimeError)
FLOAT_DTYPES = ["float32", "float64", "float16", "bfloat16"]
ODD_DTYPES = ["int32", "bool", "complex64", "uint8"]
SPECIAL = [0.0, -0.0, 1e-3, 0.3, 1.0, 2.5, 80.0, 1e15, -1.0, 5e-324, 1e-300, 1e16, 1e308,
           math.nan, math.inf, -math.inf]
# Bounded for CI (the whole module: about a minute on 2 cores). The examples are the same on
# every run unless RELAYDIFF_FUZZ_RANDOM=1 (then raise RELAYDIFF_FUZZ_EXAMPLES for a long hunt).
# The device a case's "cpu" tensors are made on: RELAYDIFF_FUZZ_DEVICE=cuda runs the same
# cases through the CUDA kernels (test_fuzz_on_cuda below does, in a child pytest).
FUZZ_DEVICE = os.environ.get("RELAYDIFF_FUZZ_DEVICE", "cpu")
FUZZ = settings(max_examples=int(os.environ.get("RELAYDIFF_FUZZ_EXAMPLES", "80")), deadline=None,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
                derandomize=os.environ.get("RELAYDIFF_FUZZ_RANDOM", "0") == "0", database=None)


def _tensor(spec: dict) -> torch.Tensor:
    """A tensor from a JSON-able description: shape, dtype, device, layout, value scale."""
    shape, dtype, layout = list(spec["shape"]), getattr(torch, spec["dtype"]), spec.get("layout", "contiguous")
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    if layout == "transposed" and len(shape) >= 2:
        shape[-1], shape[-2] = shape[-2], shape[-1]
    elif layout == "sliced" and shape:
        shape[-1] *= 2
    base = torch.randn(shape, generator=g, dtype=torch.float64) * spec.get("scale", 1.0)
    t = base.to(dtype) if dtype.is_floating_point or dtype.is_complex else (base * 10).to(dtype)
    if layout == "transposed" and len(shape) >= 2:
        t = t.transpose(-1, -2)
    elif layout == "sliced" and shape:
        t = t[..., ::2]
    elif layout == "channels_last" and t.dim() == 4:
        t = t.to(memory_format=torch.channels_last)
    device = spec.get("device", "cpu")
    return t.to(FUZZ_DEVICE if device == "cpu" else device)


@st.composite
def image_specs(draw, p=None, batch=None, like=None):
    """Mostly valid images ([B, C, H, W], H and W multiples of p, a float dtype), sometimes not."""
    if like is not None and draw(st.integers(0, 9)) < 9:
        return dict(like, seed=draw(st.integers(0, 1000)))
    if draw(st.integers(0, 5)) < 5:
        pp = p if isinstance(p, int) and p in (2, 4, 8, 16) else 4
        shape = [batch if batch is not None else draw(st.integers(0, 3)), draw(st.integers(1, 3)),
                 pp * draw(st.integers(0 if draw(st.booleans()) else 1, 3)), pp * draw(st.integers(1, 3))]
        dtype = draw(st.sampled_from(FLOAT_DTYPES))
    else:
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=5))
        dtype = draw(st.sampled_from(FLOAT_DTYPES + ODD_DTYPES))
    return dict(shape=shape, dtype=dtype, device=draw(st.sampled_from(["cpu"] * 6 + ["meta"])),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"])),
                scale=draw(st.sampled_from([1.0, 1.0, 1e-30, 1e4])), seed=draw(st.integers(0, 1000)))


def mostly(valid, invalid, odds: int = 12):
    """``valid`` ``odds`` times in ``odds + 1``: enough valid calls reach the kernels."""
    return st.integers(0, odds).flatmap(lambda k: invalid if k == odds else valid)   # simplest: valid


def per_sample_values(batch: int):
    """sigma / tau as the public ops take them: numbers (incl. NaN, inf, denormal, huge),
    per-sample tensors of the right or a wrong shape or dtype, or not a number at all."""
    return mostly(
        st.one_of(st.sampled_from(SPECIAL[:8]), st.lists(st.sampled_from(SPECIAL[:8]), min_size=batch, max_size=batch)
                  .map(lambda v: {"values": v, "dtype": "float64"})),
        st.one_of(
            st.sampled_from(SPECIAL[8:]),
            st.integers(-2, 5),
            st.lists(st.sampled_from(SPECIAL), min_size=0, max_size=4).map(
                lambda v: {"values": v, "dtype": "float32"}),
            st.sampled_from([None, "0.5", {"values": [1, 2], "dtype": "int64"},
                             {"values": [[0.5]], "dtype": "float64"}])),
        odds=3)


def _value(v, device=None):
    if isinstance(v, dict) and "values" in v:
        return torch.tensor(v["values"], dtype=getattr(torch, v["dtype"]), device=device or FUZZ_DEVICE)
    if isinstance(v, dict):
        return _tensor(v)
    return v


PATCH = mostly(st.sampled_from([4, 2, 8, 16]), st.sampled_from([1, 3, 0, -4, 32, 2.0, True, None]))
BLOCK = mostly(st.sampled_from([4, 1, 2, 3, 16]), st.sampled_from([17, 0, -1, 4.0, None]))
SCALAR = mostly(st.sampled_from([0.0, 0.15, 0.5, 0.999, 1e-3]),
                st.sampled_from([1.0, -0.1, 1.5, 1e15, 1e16, math.nan, math.inf, "0.1", None]))
SEED = mostly(st.sampled_from([None, 0, 1, 7, 2 ** 63 - 1]), st.sampled_from([2 ** 63, -1, True, 1.5, "3"]))


OPS = ["patch_dct", "patch_idct", "blur_factors", "patch_blur", "block_noise", "mixed_noise", "relay_corrupt",
       "relay_step"]


@st.composite
def public_calls(draw, op: str):
    """``(op, args, kwargs)`` of one call of the public op ``op``, args as JSON-able descriptions."""
    p = draw(PATCH)
    img = draw(image_specs(p))
    b = img["shape"][0] if len(img["shape"]) == 4 else 2
    if op in ("patch_dct", "patch_idct"):
        return op, [img, p], {}
    if op == "blur_factors":
        return op, [draw(per_sample_values(b))], dict(patch_size=p, min_scale=draw(SCALAR))
    if op == "patch_blur":
        return op, [img, draw(per_sample_values(b))], dict(patch_size=p, min_scale=draw(SCALAR))
    if op == "block_noise":
        return op, [img], dict(block_size=draw(BLOCK), seed=draw(SEED))
    noise = dict(alpha=draw(SCALAR), block_size=draw(BLOCK), normalize=draw(st.booleans()), seed=draw(SEED))
    if op == "mixed_noise":
        return op, [img], noise
    if op == "relay_corrupt":
        return op, [img, draw(per_sample_values(b)), draw(per_sample_values(b))], dict(
            patch_size=p, min_scale=draw(SCALAR), **noise)
    heun = draw(st.booleans())
    other = [draw(image_specs(p, like=img)) for _ in range(3 if heun else 1)]
    kw = dict(patch_size=p, min_scale=draw(SCALAR), s_noise=draw(SCALAR), **noise)
    if heun:
        kw.update(x_prop=other[1], denoised_prop=other[2])
    sigma, sigma_next, tau, tau_next = (draw(per_sample_values(b)) for _ in range(4))
    if draw(st.integers(0, 3)) < 3:   # mostly a step down in noise, as samplers take it
        sigma = draw(st.sampled_from([0.3, 1.0, 2.5, 80.0]))
        sigma_next = sigma * draw(st.sampled_from([0.0, 0.5, 1.0])) if not heun else sigma / 2
    return op, [img, other[0], sigma, sigma_next, tau, tau_next], kw


def _materialise(args, kwargs):
    return [_value(a) for a in args], {k: _value(v) for k, v in kwargs.items()}


def _assert_same(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == want.shape and out.dtype == want.dtype and out.device == want.device
    if out.device.type == "meta":
        return
    assert out.is_contiguous()
    # the kernels and the twins compute in float32 (float64 for float64) in different orders:
    # the float32 tolerance is the one tests/test_ops.py uses; half types round once at the end
    tol = {torch.float64: 1e-9, torch.float32: 2e-4}.get(dtype, 2e-2)
    scale = max(1.0, float(want.double().abs().nan_to_num(0, 0, 0).max())) if want.numel() else 1.0
    torch.testing.assert_close(out.double(), want.double(), rtol=tol, atol=tol * scale, equal_nan=True)


@pytest.mark.parametrize("op", OPS)
@FUZZ
@given(data=st.data())
def test_public_ops_refuse_cleanly_or_match_the_twin(op, data):
    from relaydiff import ops
    from relaydiff.ops import reference
    name, args, kwargs = data.draw(public_calls(op))
    a, kw = _materialise(args, kwargs)
    torch.manual_seed(0)   # seed=None draws from it: the twin below draws the same seed
    try:
        out = getattr(ops, name)(*a, **kw)
    except CLEAN as e:
        assert _NAMED.search(str(e)), f"{name}: {type(e).__name__} names no argument: {e}"
        event(f"{name}: refused")
        a, kw = _materialise(args, kwargs)
        with pytest.raises(CLEAN):   # the twin validates the same way
            getattr(reference, name)(*a, **kw)
        return
    a, kw = _materialise(args, kwargs)
    torch.manual_seed(0)
    want = getattr(reference, name)(*a, **kw)
    dtype = a[0].dtype if isinstance(a[0], torch.Tensor) else torch.float64
    _assert_same(out, want, dtype)
    event(f"{name}: equal to the twin")


# -- direct torch.ops.relaydiff calls, in a child process --------------------------------

DIRECT_CHILD = r'''
import json, math, sys, traceback
import torch
sys.path.insert(0, sys.argv[2])
import test_fuzz as F
from relaydiff import ops
from relaydiff.ops import reference as R

def val(v):
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return F._value(v)

cases = json.load(open(sys.argv[1]))
for i, (name, args) in enumerate(cases):
    print(json.dumps({"start": i}), flush=True)
    a = [val(x) for x in args]
    try:
        out = getattr(torch.ops.relaydiff, name)(*a)
    except Exception as e:
        print(json.dumps({"i": i, "raised": type(e).__name__, "msg": str(e).splitlines()[0][:300]}), flush=True)
        continue
    rec = {"i": i, "shape": list(out.shape), "device": out.device.type}
    try:
        want = getattr(R, name + "_impl")(*[val(x) for x in args])
        F._assert_same(out, want, a[0].dtype)
        rec["match"] = True
    except Exception as e:
        rec["match"] = False
        rec["why"] = str(e)[:300]
    print(json.dumps(rec), flush=True)
'''


def _json_float(v):
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


@st.composite
def direct_calls(draw, op: str):
    """``(op, schema arguments)`` of a direct ``torch.ops.relaydiff`` call, JSON-able."""
    name, args, kw = draw(public_calls(op))
    if name == "blur_factors":
        name, args = "patch_blur", [draw(image_specs(4)), args[0]]
    img = args[0]
    b = img["shape"][0] if len(img["shape"]) == 4 else 2

    def per_sample():   # the schema wants a tensor [B]: give one, often right, sometimes not
        return draw(mostly(
            st.lists(st.sampled_from(SPECIAL[2:8]), min_size=b, max_size=b).map(
                lambda v: {"values": v, "dtype": "float64"}), st.one_of(
            st.lists(st.sampled_from(SPECIAL), min_size=b, max_size=b).map(
                lambda v: {"values": v, "dtype": "float32"}),
            st.builds(dict, shape=st.just([b]), dtype=st.just("float64"),
                      device=st.sampled_from(["meta", "cpu"]), scale=st.just(1.0)),
            st.sampled_from([{"values": [0.5] * (b + 1), "dtype": "float64"}, {"values": [[0.5]], "dtype": "float64"},
                             {"values": [1] * b, "dtype": "int64"}])), odds=4))

    p = draw(mostly(st.sampled_from([4, 2, 8, 16]), st.sampled_from([3, 0, -4])))
    m = draw(mostly(st.sampled_from([1e-3, 0.0, 0.5]), st.sampled_from([-0.1, 1.0, math.nan])))
    alpha = draw(mostly(st.sampled_from([0.0, 0.15, 1e15]), st.sampled_from([-1.0, math.inf, math.nan])))
    s = draw(mostly(st.sampled_from([4, 1, 2, 16]), st.sampled_from([17, 0, -3])))
    seed = draw(mostly(st.sampled_from([0, 1, 12345, 2 ** 62]), st.just(-1)))
    nrm = draw(st.booleans())
    if name in ("patch_dct", "patch_idct"):
        out = [img, p]
    elif name == "patch_blur":
        out = [img, per_sample(), p, m]
    elif name == "block_noise":
        out = [img, s, seed]
    elif name == "mixed_noise":
        out = [img, alpha, s, nrm, seed]
    elif name == "relay_corrupt":
        out = [img, per_sample(), per_sample(), p, alpha, s, m, nrm, seed]
    else:
        heun = draw(st.booleans())
        others = [draw(image_specs(4, like=img)) for _ in range(3)]
        out = [img, others[0], others[1] if heun else None, others[2] if heun else None,
               per_sample(), per_sample(), per_sample(), per_sample(),
               draw(mostly(st.sampled_from([0.2, 0.0, 1.0]), st.sampled_from([1.5, math.nan]))), p, alpha, s, m, nrm,
               seed]
    return name, [_json_float(v) for v in out]


@settings(FUZZ, max_examples=int(os.environ.get("RELAYDIFF_FUZZ_BATCHES", "5")), phases=[Phase.generate])
@given(batch=st.tuples(*[st.lists(direct_calls(op), min_size=5, max_size=5) for op in OPS]).map(
    lambda groups: [call for group in groups for call in group]))
def test_direct_op_calls_never_crash_and_refuse_cleanly_or_match_the_twin(batch, tmp_path_factory):
    from relaydiff.ops import _ext
    if not _ext.loaded():
        pytest.skip("relaydiff._C is not built: there are no direct ops")
    path = tmp_path_factory.mktemp("direct") / "cases.json"
    path.write_text(json.dumps(batch))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", DIRECT_CHILD, str(path), str(pathlib.Path(__file__).parent)],
                          capture_output=True, text=True, env=env, timeout=600)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [r["start"] for r in records if "start" in r]
    assert proc.returncode == 0, (f"the child died (status {proc.returncode}) in case {started[-1] if started else None}: "
                                  f"{batch[started[-1]] if started else None}\n{proc.stderr[-2000:]}")
    for r in (r for r in records if "i" in r):
        case = batch[r["i"]]
        if "raised" in r:
            assert r["raised"] in ("RuntimeError", "ValueError", "TypeError"), (case, r)
            assert _NAMED.search(r["msg"]) or "Expected a value of type" in r["msg"], (case, r)
        else:
            assert r["match"], (case, r)
    done = [r for r in records if "i" in r]
    assert len(done) == len(batch)
    # not a suite that passes by refusing everything: a good share reach a kernel and match
    assert sum(1 for r in done if r.get("match")) >= len(batch) // 10, [r for r in done if "raised" in r][:5]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fuzz_on_cuda():
    """The two op fuzzers above with every "cpu" tensor of a case on the GPU (the CUDA kernels
    against the twin on the GPU), in a child pytest so that a crash cannot take this run down."""
    env = dict(os.environ, RELAYDIFF_FUZZ_DEVICE="cuda")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "public_ops_refuse or direct_op_calls_never_crash"],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]


# ============================================================================ command line

def _png_bytes(size=(24, 24), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = __import__("io").BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _chunks(png: bytes):
    """``[(type, data)]`` of a PNG."""
    out, i = [], 8
    while i < len(png):
        n = struct.unpack(">I", png[i:i + 4])[0]
        out.append((png[i + 4:i + 8], png[i + 8:i + 8 + n]))
        i += 12 + n
    return out


def _png_from_chunks(chunks) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def _huge_header_png(w=12000, h=12000) -> bytes:
    """A valid-looking PNG whose IHDR claims ``w x h`` (CRC fixed) over 24 x 24 pixels of data."""
    chunks = _chunks(_png_bytes())
    ihdr = chunks[0][1]
    chunks[0] = (b"IHDR", struct.pack(">II", w, h) + ihdr[8:])
    return _png_from_chunks(chunks)


def _corrupt_idat_png() -> bytes:
    """One flipped byte inside the compressed pixels, the chunk CRC recomputed (so only zlib sees it)."""
    chunks = _chunks(_png_bytes(seed=1))
    k = next(i for i, (t, _) in enumerate(chunks) if t == b"IDAT")
    data = bytearray(chunks[k][1])
    data[len(data) // 2] ^= 0xFF
    chunks[k] = (b"IDAT", bytes(data))
    return _png_from_chunks(chunks)


def _folder(root: pathlib.Path, name: str, files: dict[str, bytes]) -> str:
    d = root / name
    d.mkdir()
    for n, data in files.items():
        (d / n).write_bytes(data)
    return str(d)


def _zip(root: pathlib.Path, name: str, files: dict[str, bytes], corrupt: str | None = None) -> str:
    path = root / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for n, data in files.items():
            z.writestr(n, data)
    if corrupt is not None:   # flip a byte of a stored member's data: its CRC no longer matches
        raw = bytearray(path.read_bytes())
        at = raw.index(files[corrupt][40:60])
        raw[at] ^= 0xFF
        path.write_bytes(bytes(raw))
    return str(path)


def _weights(path: pathlib.Path, stage: str, res: int, **network_overrides) -> str:
    net = network_kwargs("tiny", res)
    torch.manual_seed(0)
    model = build_model(net)
    meta = {"stage": stage, "network": {**net, **network_overrides}, "precond": model.config(),
            "relay": RelayConfig().to_dict() if stage == "relay" else None, "step": 0, "kimg": 0.0,
            "resolution": res, "label_dim": 0}
    save_weights(path, {f"ema.{k}": v for k, v in model.state_dict().items()}, meta)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every bad input the table uses, written once (the table must then write nothing more)."""
    root = tmp_path_factory.mktemp("inputs")
    good = {f"{i}.png": _png_bytes(seed=i) for i in range(4)}
    f = dict(root=root)
    f["good"] = _folder(root, "good", good)
    f["text_png"] = _folder(root, "text_png", {**good, "notes.png": b"these are my notes, not an image\n"})
    f["corrupt"] = _folder(root, "corrupt", {"0.png": _corrupt_idat_png(), "1.png": _corrupt_idat_png()})
    f["truncated"] = _folder(root, "truncated", {"0.png": _png_bytes()[:-40], "1.png": _png_bytes(seed=3)[:300]})
    f["huge"] = _folder(root, "huge", {**good, "big.png": _huge_header_png()})
    f["zip_corrupt"] = _zip(root, "corrupt.zip", good, corrupt="2.png")
    f["zip_big"] = _zip(root, "big.zip", {**good, "big.png": _png_bytes((200, 200))})   # with a 1000-pixel cap
    mu, sigma = _npy(np.zeros(4)), _npy(np.eye(4))
    f["stats_corrupt"] = _npz(root / "stats_corrupt.npz", {"mu": mu, "sigma": sigma}, flip="sigma")
    f["stats_huge"] = _npz(root / "stats_huge.npz", {"mu": _npy(header={"descr": "<f8", "shape": (10 ** 11,)},
                                                               data=bytes(64)), "sigma": sigma})   # 745 GiB
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)   # 12 KiB: read in chunks
    f["npz_corrupt"] = _npz(root / "npz_corrupt.npz", {"arr_0": _npy(pixels)}, flip="arr_0")
    f["base"] = _weights(root / "base.safetensors", "base", 8)
    f["relay"] = _weights(root / "relay.safetensors", "relay", 32)
    f["inflated"] = _weights(root / "inflated.safetensors", "base", 8, model_channels=512)
    (root / "config.json").write_text(json.dumps({"stage": "base"}))
    f["config"] = str(root / "config.json")
    torch.save({"optimizer": {}, "step": 1}, root / "step-0000001.state.pt")
    f["state"] = str(root / "step-0000001.state.pt")
    f["garbage"] = str(root / "garbage.pkl")
    pathlib.Path(f["garbage"]).write_bytes(bytes(range(256)) * 4)
    for name, latest, state in (("run_malformed", "step-0000001.safetensors", b"\x80\x02}q\x00."),
                                ("run_escape", "../../base.safetensors", None)):
        ckpts = root / name / "checkpoints"
        ckpts.mkdir(parents=True)
        (ckpts / "latest").write_text(latest + "\n")
        _weights(ckpts / "step-0000001.safetensors", "base", 16)
        (ckpts / "step-0000001.state.pt").write_bytes(state or b"")   # an empty dict, not a training state
        f[name] = str(root / name)
    used = root / "used"
    used.mkdir()
    (used / "keep.txt").write_text("an earlier run's file\n")
    f["used"] = str(used)
    return f


def _all_files(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


T = "train --stage base --steps 1 --device cpu --quiet --resolution 16 --out {out} "

# (id, argv with {name} taken from the inputs fixture, words the one error line must contain)
CLI_CASES = [
    ("train-device", "train --stage base --steps 1 --data {good} --out {out} --device gpu", ["--device", "gpu"]),
    ("train-text-png", T + "--data {text_png}", ["notes.png"]),
    ("train-corrupt-cached", T + "--data {corrupt}", ["0.png", "corrupt"]),
    ("train-corrupt-streamed", T + "--data {corrupt} --cache no --workers 0", ["png", "corrupt"]),
    ("train-truncated", T + "--data {truncated} --cache no --workers 0",
     ["png"]),
    ("train-huge-header", T + "--data {huge}", ["big.png", "12000x12000",
                                                                                          "--max-image-pixels"]),
    ("train-zip-corrupt", T + "--data {zip_corrupt}", ["2.png"]),
    ("train-zip-inflates", T + "--data {zip_big} --max-image-pixels 1000",
     ["big.png", "--max-image-pixels"]),
    ("train-resume-malformed", "train --stage base --steps 2 --device cpu --quiet --resolution 16 --resume "
     "--data {good} --out {run_malformed}", ["cannot resume", "malformed"]),
    ("train-resume-escape", "train --stage base --steps 2 --device cpu --quiet --resolution 16 --resume "
     "--data {good} --out {run_escape}", ["latest", "../../base.safetensors"]),
    ("sample-escape", "sample --stage1 {run_escape} --stage2 {relay} --out {out} --device cpu", ["latest"]),
    ("train-bad-cap", T + "--data {good} --max-image-pixels 0", ["--max-image-pixels"]),
    ("sample-device", "sample --stage1 {base} --stage2 {relay} --out {out} --device gpu", ["--device"]),
    ("sample-config-json", "sample --stage1 {config} --stage2 {relay} --out {out} --device cpu", ["config.json"]),
    ("sample-state-pt", "sample --stage1 {state} --stage2 {relay} --out {out} --device cpu", ["state.pt"]),
    ("sample-inflated", "sample --stage1 {inflated} --stage2 {relay} --out {out} --device cpu",
     ["inflated.safetensors", "do not fit"]),
    ("sample-used-out", "sample --stage1 {base} --stage2 {relay} --out {used} --device cpu", ["--out", "already"]),
    ("sample-resume-no-run", "sample --stage1 {base} --stage2 {relay} --out {used} --device cpu --resume",
     ["--resume", "no relaydiff sample run"]),
    ("sample-seed-mod-no-seeds", "sample --stage1 {base} --stage2 {relay} --out {out} --device cpu --class seed-mod",
     ["seed-mod", "--seeds"]),
    ("train-checkpoint-minutes", T + "--data {good} --checkpoint-minutes 0", ["checkpoint", "minutes"]),
    ("upscale-seeds-count", "upscale --stage2 {relay} --in {good} --out {out} --device cpu --seeds 0-999",
     ["--seeds", "1000 seeds"]),
    ("upscale-text-png", "upscale --stage2 {relay} --in {text_png} --out {out} --device cpu --resize", ["notes.png"]),
    ("upscale-device", "upscale --stage2 {relay} --in {good} --out {out} --device gpu", ["--device"]),
    ("upscale-config", "upscale --stage2 {config} --in {good} --out {out} --device cpu", ["config.json"]),
    ("eval-text-png", "eval --images {text_png} --ref {text_png} --metrics psnr --out {out}.json --device cpu",
     ["notes.png"]),
    ("eval-device", "eval --images {good} --ref {good} --metrics psnr --device gpu", ["--device"]),
    ("eval-zip-corrupt", "eval --images {zip_corrupt} --ref {zip_corrupt} --metrics swd --out {out}.json "
     "--device cpu --no-cache", ["2.png"]),
    ("eval-ref-stats-corrupt", "eval --images {good} --ref {stats_corrupt} --metrics fid --device cpu --no-cache",
     ["stats_corrupt.npz", "CRC"]),
    ("eval-ref-stats-huge", "eval --images {good} --ref {stats_huge} --metrics fid --device cpu --no-cache",
     ["stats_huge.npz", "100000000000"]),
    ("eval-npz-corrupt", "eval --images {npz_corrupt} --ref {npz_corrupt} --metrics psnr --out {out}.json "
     "--device cpu --no-cache", ["npz_corrupt.npz", "arr_0"]),
    ("eval-huge", "eval --images {huge} --ref {huge} --metrics psnr --device cpu", ["big.png", "12000x12000"]),
    ("analyze-text-png", "analyze --images {text_png} --out {out} --resolution 16 --factor 4 --quiet", ["notes.png"]),
    ("analyze-corrupt", "analyze --images {corrupt} --out {out} --resolution 16 --factor 4 --quiet", ["corrupt"]),
    ("convert-safetensors", "convert {base} {out}.safetensors", ["safetensors", "no conversion"]),
    ("convert-garbage", "convert {garbage} {out}.safetensors", ["garbage.pkl"]),
    ("convert-config", "convert {config} {out}.safetensors", ["config.json"]),
    ("demo-device", "demo --out {out} --device gpu --smoke", ["--device"]),
    ("study-device", "study --out {out} --device gpu --smoke", ["--device"]),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(case, inputs, tmp_path, capsys):
    name, argv, words = case
    out = tmp_path / "out"
    argv = argv.format(out=out, **{k: v for k, v in inputs.items() if k != "root"}).split()
    before = _all_files(inputs["root"])
    with warnings.catch_warnings(record=True) as caught:   # a warning would be a second line on stderr
        warnings.simplefilter("always")
        rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert not caught, [str(w.message) for w in caught]
    command = argv[0]
    assert rc == 2, (rc, err)
    assert err.count("\n") == 0 and err.startswith(f"relaydiff {command}: error: "), err
    for w in words:
        assert w in err, (w, err)
    assert list(tmp_path.iterdir()) == [], "files written: " + str(list(tmp_path.rglob("*")))
    assert _all_files(inputs["root"]) == before


# ============================================================================ malicious and broken files

# what a loader may raise for a file it cannot use: each names the file or the defect
FILE_ERRORS = (ValueError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """One small valid file per format a loader reads: relaydiff .safetensors, a torch.save zip
    and a legacy torch.save of a state dict, and a TorchScript archive."""
    root = tmp_path_factory.mktemp("files")
    state = {"layers.conv.weight": torch.randn(4, 3, 3, 3), "output.weight": torch.randn(5, 4)}
    torch.save(state, root / "zip.pt")
    torch.save(state, root / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 4, 3)), str(root / "script.pt"))
    return {name: (root / f).read_bytes() for name, f in [("zip", "zip.pt"), ("legacy", "legacy.pt"),
                                                           ("script", "script.pt")]} | {
        "safetensors": pathlib.Path(_weights(root / "w.safetensors", "base", 8)).read_bytes()}


@st.composite
def mutations(draw, size: int):
    """Byte-level damage: flipped bytes, a truncation, a spliced run of bytes, or several."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "zero"]))
        at = draw(st.integers(0, max(0, size - 1)))
        edits.append((kind, at, draw(st.binary(min_size=1, max_size=16))))
    return edits


def _damage(blob: bytes, edits) -> bytes:
    b = bytearray(blob)
    for kind, at, data in edits:
        at = min(at, max(0, len(b) - 1))
        if kind == "flip" and b:
            b[at] ^= data[0] or 1
        elif kind == "truncate":
            del b[at:]
        elif kind == "splice":
            b[at:at] = data
        elif kind == "zero":
            b[at:at + len(data)] = bytes(len(b[at:at + len(data)]))
    return bytes(b)


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy", "script"])
@settings(FUZZ, max_examples=int(os.environ.get("RELAYDIFF_FUZZ_FILES", "15")))
@given(data=st.data())
def test_damaged_files_fail_cleanly_in_every_loader(fmt, weight_files, data, tmp_path_factory, capsys):
    """Every loader of a user-named file (load_model, convert, the Inception reader) either
    reads a damaged file or refuses it with a clean error: no other exception type, no hang;
    ``relaydiff convert`` and ``relaydiff sample`` end with one line and status 2."""
    from relaydiff.metrics import load_inception
    from relaydiff.models import convert_release, load_model
    blob = _damage(weight_files[fmt], data.draw(mutations(len(weight_files[fmt]))))
    path = tmp_path_factory.mktemp("damaged") / f"file.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    path.write_bytes(blob)
    for load in (load_model, lambda p: convert_release(p, stage="base"), load_inception):
        try:
            load(path)
        except FILE_ERRORS as e:
            assert str(e), type(e)
    # the same file through the command line: converted or refused in one line with status 2,
    # and sample refuses it as a relay stage (or as a stage 1) before sampling anything
    out = path.parent / "out"
    for argv in (["convert", str(path), str(out / "w.safetensors"), "--stage", "base", "--quiet"],
                 ["sample", "--stage1", str(path), "--stage2", str(path), "--out", str(out / "s"), "--n", "1",
                  "--device", "cpu", "--quiet"]):
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "Traceback" not in err[0] or rc == 0 and argv[0] == "convert", \
            (argv[0], rc, err[-5:])
    assert not (out / "s").exists()


def _nested_pickle(depth: int, opener: bytes, closer: bytes) -> bytes:
    return b"\x80\x04" + opener * depth + closer * depth + b"."


@pytest.mark.parametrize("blob", [
    _nested_pickle(100_000, b"]", b""),                                   # lists inside lists, unclosed
    b"\x80\x04" + b"]" * 50_000 + b"a" * 49_999 + b".",                  # 50k nested lists
    b"\x80\x04" + b"}\x8c\x03ema" * 50_000 + b"}" + b"s" * 50_000 + b".",  # {"ema": {"ema": ...}}
    b"\x80\x04\x8c\x05posix\x8c\x06system\x93\x8c\x04true\x85R.",          # os.system("true")
    b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.",            # eval("1")
    bytes(range(256)) * 8,
], ids=["unclosed", "deep-lists", "deep-dicts", "system", "eval", "garbage"])
def test_hostile_pickles_are_refused(blob, tmp_path):
    from relaydiff.metrics import load_inception
    from relaydiff.models import convert_release
    path = tmp_path / "hostile.pkl"
    path.write_bytes(blob)
    for load in (lambda p: convert_release(p, stage="base"), load_inception):
        with pytest.raises(FILE_ERRORS):
            load(path)
