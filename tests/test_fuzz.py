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
import os
import pathlib
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from relaydiff.cli import main
from relaydiff.config import RelayConfig
from relaydiff.models import build_model, network_kwargs, save_weights


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
    f["base"] = _weights(root / "base.safetensors", "base", 8)
    f["relay"] = _weights(root / "relay.safetensors", "relay", 32)
    f["inflated"] = _weights(root / "inflated.safetensors", "base", 8, model_channels=512)
    (root / "config.json").write_text(json.dumps({"stage": "base"}))
    f["config"] = str(root / "config.json")
    torch.save({"optimizer": {}, "step": 1}, root / "step-0000001.state.pt")
    f["state"] = str(root / "step-0000001.state.pt")
    f["garbage"] = str(root / "garbage.pkl")
    pathlib.Path(f["garbage"]).write_bytes(bytes(range(256)) * 4)
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
    ("train-bad-cap", T + "--data {good} --max-image-pixels 0", ["--max-image-pixels"]),
    ("sample-device", "sample --stage1 {base} --stage2 {relay} --out {out} --device gpu", ["--device"]),
    ("sample-config-json", "sample --stage1 {config} --stage2 {relay} --out {out} --device cpu", ["config.json"]),
    ("sample-state-pt", "sample --stage1 {state} --stage2 {relay} --out {out} --device cpu", ["state.pt"]),
    ("sample-inflated", "sample --stage1 {inflated} --stage2 {relay} --out {out} --device cpu",
     ["inflated.safetensors", "do not fit"]),
    ("sample-used-out", "sample --stage1 {base} --stage2 {relay} --out {used} --device cpu", ["--out", "already"]),
    ("upscale-text-png", "upscale --stage2 {relay} --in {text_png} --out {out} --device cpu --resize", ["notes.png"]),
    ("upscale-device", "upscale --stage2 {relay} --in {good} --out {out} --device gpu", ["--device"]),
    ("upscale-config", "upscale --stage2 {config} --in {good} --out {out} --device cpu", ["config.json"]),
    ("eval-text-png", "eval --images {text_png} --ref {text_png} --metrics psnr --out {out}.json --device cpu",
     ["notes.png"]),
    ("eval-device", "eval --images {good} --ref {good} --metrics psnr --device gpu", ["--device"]),
    ("eval-zip-corrupt", "eval --images {zip_corrupt} --ref {zip_corrupt} --metrics swd --out {out}.json "
     "--device cpu --no-cache", ["2.png"]),
    ("eval-huge", "eval --images {huge} --ref {huge} --metrics psnr --device cpu", ["big.png", "12000x12000"]),
    ("analyze-text-png", "analyze --images {text_png} --out {out} --resolution 16 --factor 4 --quiet", ["notes.png"]),
    ("analyze-corrupt", "analyze --images {corrupt} --out {out} --resolution 16 --factor 4 --quiet", ["corrupt"]),
    ("convert-safetensors", "convert {base} {out}.safetensors", ["safetensors", "no conversion"]),
    ("convert-garbage", "convert {garbage} {out}.safetensors", ["garbage.pkl"]),
    ("convert-config", "convert {config} {out}.safetensors", ["config.json"]),
    ("demo-device", "demo --out {out} --device gpu --smoke", ["--device"]),
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
