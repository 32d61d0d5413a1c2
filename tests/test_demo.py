"""``relaydiff demo`` end to end at smoke size (real bundled photos, real training, real
sampling; ~10 s on 2 cores), its figures and numbers checked against the PNGs it wrote."""
from __future__ import annotations

import json
import os
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from relaydiff.cli import main
from relaydiff.pipeline import RelayPipeline

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

# the documented sheet layout: 64 px cells drawn 2x, 2 px apart in a triplet, 8 px between
# triplets and around them, a 16 px title band (and a 16 px caption band under superres rows)
CELL, IN_GAP, GAP, BAND = 128, 2, 8, 16
TRIPLET = 3 * CELL + 2 * IN_GAP
QUINT = 5 * CELL + 4 * IN_GAP         # superres.png: input | bicubic | relay | relay, more levels | truth


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB", (path, im.format, im.mode)
        return np.asarray(im).copy()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    rc = main(["demo", "--smoke", "--out", str(out), "--quiet", "--seed", "3", "--device", "cpu"])
    assert rc == 0
    return out


def test_files_and_sizes(demo):
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["base"]["steps"] == 2 and summary["relay"]["steps"] == 2
    n, held = 4, summary["heldout"]
    assert len(held) == 2
    for k in range(n):
        assert _png(demo / "samples" / f"{k:06d}.png").shape == (64, 64, 3)
        assert _png(demo / "samples" / "low" / f"{k:06d}.png").shape == (16, 16, 3)
    for name in held:
        assert _png(demo / "superres" / f"{name}.png").shape == (64, 64, 3)
        assert _png(demo / "superres_detail" / f"{name}.png").shape == (64, 64, 3)
        assert _png(demo / "data" / "heldout" / "high" / f"{name}.png").shape == (64, 64, 3)
        assert _png(demo / "data" / "heldout" / "low" / f"{name}.png").shape == (16, 16, 3)
    with Image.open(demo / "spectrum.png") as im:      # matplotlib comes with the [demo] extra
        assert im.format == "PNG" and min(im.size) > 200
    assert "spectrum.png" in summary["files"]
    # 4 sample triplets in one row; 2 super-resolution groups of 5 with a caption band
    assert _png(demo / "samples.png").shape == (BAND + GAP + CELL + GAP, 4 * TRIPLET + 5 * GAP, 3)
    assert _png(demo / "superres.png").shape == (BAND + GAP + CELL + BAND + GAP, 2 * QUINT + 3 * GAP, 3)
    for stage in ("base", "relay"):
        log = [json.loads(line) for line in (demo / stage / "log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == 2 and np.isfinite(log[-1]["loss"])


def test_sheet_cells_are_the_written_images(demo):
    sheet = _png(demo / "samples.png")
    top = BAND + GAP
    for k in range(4):
        x0 = GAP + k * (TRIPLET + GAP)
        low = _png(demo / "samples" / "low" / f"{k:06d}.png")
        high = _png(demo / "samples" / f"{k:06d}.png")
        stage1, nearest, relay = (sheet[top:top + CELL, x0 + j * (CELL + IN_GAP):x0 + j * (CELL + IN_GAP) + CELL]
                                  for j in range(3))
        # the 16 px sample at its size (x2) in the middle of its cell; nearest x4 (x2); the relay output (x2)
        o = (CELL - 32) // 2
        assert np.array_equal(stage1[o:o + 32, o:o + 32], low.repeat(2, 0).repeat(2, 1))
        assert np.array_equal(nearest, low.repeat(8, 0).repeat(8, 1))
        assert np.array_equal(relay, high.repeat(2, 0).repeat(2, 1))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Float64 PSNR of two uint8 images mapped to [-1, 1] (data range 2)."""
    x, y = a.astype(np.float64) / 127.5 - 1, b.astype(np.float64) / 127.5 - 1
    return float(10 * np.log10(4.0 / np.mean((x - y) ** 2)))


def test_metrics_match_the_pngs(demo):
    metrics = json.loads((demo / "metrics.json").read_text())
    for row in metrics["per_tile"]:
        truth = _png(demo / "data" / "heldout" / "high" / f"{row['name']}.png")
        low = _png(demo / "data" / "heldout" / "low" / f"{row['name']}.png")
        # the low-res input is the 4x4 box average of the ground truth, rounded
        box = truth.astype(np.float64).reshape(16, 4, 16, 4, 3).mean((1, 3))
        assert np.abs(low - box).max() <= 0.5 + 1e-9
        # the demo scores float32 images (u8 / 127.5 - 1 rounded to float32: ~6e-8 relative error,
        # a few 1e-7 dB), the oracle float64 ones
        assert row["relay_psnr"] == pytest.approx(_psnr(_png(demo / "superres" / f"{row['name']}.png"), truth),
                                                  abs=1e-5)
        assert row["relay_detail_psnr"] == pytest.approx(
            _psnr(_png(demo / "superres_detail" / f"{row['name']}.png"), truth), abs=1e-5)
        assert row["nearest_psnr"] == pytest.approx(_psnr(low.repeat(4, 0).repeat(4, 1), truth), abs=1e-5)
        assert -1 <= row["relay_ssim"] <= 1
    for method in ("relay", "relay_detail", "nearest", "bicubic"):
        assert metrics[method]["psnr"] == pytest.approx(np.mean([r[f"{method}_psnr"] for r in metrics["per_tile"]]))
        assert np.isfinite(metrics[method]["hf_psd"]) and metrics[method]["swd"] > 0
    # the demo samples with consistency=True: even after 2 optimizer steps the relay output
    # box-downsamples to its input (up to clamping and uint8 rounding)
    assert metrics["relay"]["consistency"] >= 35
    assert metrics["bicubic"]["hf_psd"] > metrics["nearest"]["hf_psd"]   # bicubic lacks high frequencies


def test_superres_sheet_cells_are_the_written_images(demo):
    sheet = _png(demo / "superres.png")
    top = BAND + GAP
    names = sorted(f[:-4] for f in os.listdir(demo / "superres"))
    metrics = json.loads((demo / "metrics.json").read_text())
    for k, row in enumerate(metrics["per_tile"]):
        x0 = GAP + k * (QUINT + GAP)
        cells = [sheet[top:top + CELL, x0 + j * (CELL + IN_GAP):x0 + j * (CELL + IN_GAP) + CELL] for j in range(5)]
        low = _png(demo / "data" / "heldout" / "low" / f"{row['name']}.png")
        assert row["name"] in names
        assert np.array_equal(cells[2], _png(demo / "superres" / f"{row['name']}.png").repeat(2, 0).repeat(2, 1))
        assert np.array_equal(cells[3], _png(demo / "superres_detail" / f"{row['name']}.png")
                              .repeat(2, 0).repeat(2, 1))
        assert np.array_equal(cells[4], _png(demo / "data" / "heldout" / "high" / f"{row['name']}.png")
                              .repeat(2, 0).repeat(2, 1))
        # the input cell shows the box-downsampled truth, nearest-upsampled (within uint8 rounding)
        assert np.abs(cells[0][::8, ::8].astype(int) - low.astype(int)).max() <= 1


def test_training_set_excludes_heldout_tiles(demo):
    held = {}
    for name in json.loads((demo / "summary.json").read_text())["heldout"]:
        photo, y, x = re.fullmatch(r"(.+)_(\d{4})_(\d{4})", name).groups()
        held.setdefault(photo, []).append((int(y), int(x)))
    with zipfile.ZipFile(demo / "data" / "train.zip") as z:
        names = z.namelist()
        assert all(Image.open(z.open(n)).size == (64, 64) for n in names)
    assert len(names) == 24 + 8 and all("/" not in n for n in names)   # flat: unconditional training
    for n in names:
        m = re.fullmatch(r"tile_(.+)_(\d{4})_(\d{4})\.png", n) or re.fullmatch(
            r"crop_\d{5}_(.+)_(\d{4})_(\d{4})_(\d{3})\.png", n)
        assert m, n
        photo, y, x = m.group(1), int(m.group(2)), int(m.group(3))
        s = int(m.group(4)) if n.startswith("crop") else 64
        for hy, hx in held.get(photo, []):
            assert not (y < hy + 64 and hy < y + s and x < hx + 64 and hx < x + s), (n, hy, hx)


def test_runs_load_as_a_pipeline(demo):
    pipe = RelayPipeline.from_checkpoints(demo / "base", demo / "relay")
    assert pipe.low_shape == (3, 16, 16) and pipe.out_shape == (3, 64, 64)


def _one_line_error(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_cli_errors(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    _one_line_error(capsys, ["demo", "--smoke", "--out", str(full)], "not an empty directory")
    assert os.listdir(full) == ["keep.txt"]
    out = tmp_path / "new"
    for bad in ("0", "-1", "abc", "inf", "nan"):
        _one_line_error(capsys, ["demo", "--minutes", bad, "--out", str(out)], "--minutes must be")
    _one_line_error(capsys, ["demo", "--seed", "-2", "--out", str(out)], "--seed must be an integer")
    assert not out.exists()
