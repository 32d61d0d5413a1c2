"""relaydiff study: the arms train what they claim to, a smoke study writes its outputs and resumes."""
from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

from relaydiff.images import save_png
from relaydiff.study import (ARMS, StudyConfig, StudyError, build_cdm, curve_summary, run_study, stage_config,
                             t_interval)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 smooth random 64 px training images in a zip and 2 held-out ones."""
    root = tmp_path_factory.mktemp("study_data")
    rng = np.random.default_rng(0)
    held = root / "heldout"
    held.mkdir()

    def image():
        low = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
        return np.kron(low, np.ones((8, 8, 1))).astype(np.uint8)

    import io

    from PIL import Image
    with zipfile.ZipFile(root / "train.zip", "w") as z:
        for k in range(8):
            buf = io.BytesIO()
            Image.fromarray(image()).save(buf, format="PNG")
            z.writestr(f"img{k}.png", buf.getvalue())
    for k in range(2):
        save_png(image(), held / f"h{k}.png")
    return str(root / "train.zip"), str(held)


def _cfg(tmp_path, data, **kw):
    return StudyConfig(out=str(tmp_path / "study"), smoke=True, data=data[0], heldout=data[1], quiet=True,
                       device="cpu", **kw)


# ---------------------------------------------------------------- the arms differ in what they train

def _neighbour_cov(n: torch.Tensor) -> float:
    """Mean product of horizontally adjacent values of unit-variance noise ``[B, C, H, W]``."""
    return float((n[..., :, 1:] * n[..., :, :-1]).mean())


def _network_noise(tc, shape=(16, 3, 64, 64)) -> torch.Tensor:
    """The noise the study's TrainConfig ``tc`` feeds its network: the loss the trainer builds
    from it corrupts zero images, x_t = sigma n, so x_t / sigma = n."""
    from relaydiff.diffusion import EDMLoss, RelayLoss
    tc = tc.resolved()
    loss = EDMLoss(noise=tc.base_noise()) if tc.stage == "base" else RelayLoss(tc.relay)
    torch.manual_seed(0)
    x_t, sigma = loss.corrupt(torch.zeros(shape))
    return x_t / sigma.reshape(-1, 1, 1, 1)


def test_arms_train_different_things(tmp_path):
    cfg = StudyConfig(out=str(tmp_path), smoke=True)
    tcs = {(a, st): stage_config(a, st, cfg, "data.zip", tmp_path / a, 0)
           for a in ARMS for st in (("base",) if ARMS[a].kind == "scratch" else ("relay",) if ARMS[a].kind ==
                                   "cascade" else ())}
    relay, white, cog, short = (tcs[(a, "relay")].relay for a in ("relay", "relay-white", "cogview3", "relay-short"))
    assert (relay.alpha, relay.truncation, relay.blur) == (0.15, 0.93, "dct")
    assert white.alpha == 0.0 and white.truncation == 0.93 and white.blur == "dct"
    assert cog.blur == "linear" and cog.alpha == 0.15
    assert short.truncation == 0.15 and tcs[("relay-short", "relay")].preset == "tiny-relay"
    assert tcs[("scratch", "base")].resolution == 64 and tcs[("scratch", "base")].block_noise == 0.0
    assert tcs[("scratch-block", "base")].block_noise == 0.15
    # mixed block noise n = (e + a B(e2)) / sqrt(1 + a^2) with 4x4 blocks: adjacent pixels of
    # one block (3 of 4 pairs) share B, covariance a^2 / (1 + a^2) = 0.0220 -> 0.0165 over all
    # pairs; white noise 0. The estimate's s.e. over 16 x 3 x 64 x 63 pairs is ~0.0018.
    expected = 0.75 * 0.15 ** 2 / (1 + 0.15 ** 2)
    for arm, stage, block in (("relay", "relay", True), ("relay-white", "relay", False),
                              ("scratch", "base", False), ("scratch-block", "base", True)):
        cov = _neighbour_cov(_network_noise(tcs[(arm, stage)]))
        assert abs(cov - (expected if block else 0.0)) < 0.007, (arm, cov)


def test_cdm_network_sees_the_low_res_image():
    torch.manual_seed(0)
    model = build_cdm(32).double().eval()
    seen = []
    model.model.net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    # the zero-initialised output layer would hide the condition's effect
    torch.nn.init.normal_(model.model.net.out_conv.weight, std=0.1)
    x, sigma = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    low_a, low_b = torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        da, db = model(x, sigma, None, low=low_a), model(x, sigma, None, low=low_b)
        da2 = model(x, sigma, None, low=low_a)
    assert seen[0] == (2, 6, 32, 32)
    assert torch.equal(da, da2) and (da - db).abs().max() > 1e-3
    with pytest.raises(ValueError, match="low must be"):
        model(x, sigma, None)
    with pytest.raises(ValueError, match="low must be"):
        model(x, sigma, None, low=torch.zeros(2, 3, 7, 7, dtype=torch.float64))


def test_lowres_loss_feeds_the_box_downsample():
    from relaydiff.diffusion import LowResEDMLoss
    got = {}

    def net(x, sigma, labels, low=None):
        got["low"] = low
        return x
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    LowResEDMLoss(4)(net, images)
    ref = images.reshape(2, 3, 4, 4, 4, 4).mean(dim=(3, 5))   # float64-free closed form of the 4x4 box mean
    torch.testing.assert_close(got["low"], ref)


def test_t_interval_matches_closed_form():
    v = [1.0, 2.0, 4.0]
    r = t_interval(v)
    # t_{0.975, 2} = 4.302653; s = sqrt(7/3)
    assert r["mean"] == pytest.approx(7 / 3) and r["half"] == pytest.approx(4.302653 * (7 / 3) ** 0.5 / 3 ** 0.5,
                                                                           rel=1e-6)
    assert t_interval([3.0])["half"] is None


# ------------------------------------------------------------------------------ smoke study

def test_smoke_study_writes_outputs_and_resumes(tmp_path, tiny_data):
    cfg = _cfg(tmp_path, tiny_data, arms=("relay-short", "scratch-block", "cdm"), seeds=(0, 1))
    state = run_study(cfg)
    out = tmp_path / "study"
    for f in ("study.json", "study.md", "samples.png", "superres.png", "metrics.png", "loss.png", "curves.png"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "study.json").read_text())
    assert set(saved["results"]) == {"relay-short", "scratch-block", "cdm"}
    assert set(saved["results"]["cdm"]) == {"0", "1"}
    r = saved["results"]["relay-short"]["0"]
    assert r["nfe_64"] > 0 and r["nfe_16"] > 0 and np.isfinite(r["gen_swd"]) and np.isfinite(r["sr_psnr"])
    assert "sr_psnr" not in saved["results"]["scratch-block"]["0"]
    assert saved["summary"]["cdm"]["gen_swd"]["n"] == 2 and saved["summary"]["cdm"]["gen_swd"]["half"] is not None
    table = (out / "study.md").read_text()
    assert "| relay-short | 2 |" in table and "± " in table and "bicubic (no training)" in table
    assert state["summary"] == saved["summary"]
    # paired differences: per seed, arm minus reference, then the t interval of those
    pairs = saved["paired"]
    assert pairs["reference"] == "relay-short" and set(pairs["arms"]) == {"scratch-block", "cdm"}
    d = [saved["results"]["cdm"][s]["sr_psnr"] - saved["results"]["relay-short"][s]["sr_psnr"] for s in ("0", "1")]
    assert pairs["arms"]["cdm"]["sr_psnr"] == t_interval(d)
    assert "sr_psnr" not in pairs["arms"]["scratch-block"] and "Paired differences" in table
    # metric vs training time: 2 smoke steps, a snapshot every ceil(2 / CURVE_POINTS) = 1 step
    for arm in ("relay-short", "scratch-block", "cdm"):
        curve = saved["results"][arm]["0"]["curve"]
        assert [p["step"] for p in curve] == [1, 2], arm
        assert 0 < curve[0]["seconds"] < curve[1]["seconds"], arm
        assert all(np.isfinite(p["gen_swd"]) for p in curve)
        assert curve[0]["gen_swd"] != curve[1]["gen_swd"], arm   # the snapshot is another model
        assert all(("sr_psnr" in p) == (arm != "scratch-block") for p in curve), arm
    curves = curve_summary(saved["results"], ["cdm"], [0, 1])["cdm"]
    assert len(curves) == 2 and curves[1]["gen_swd"]["n"] == 2
    assert curves[1]["gen_swd"]["mean"] == pytest.approx(
        np.mean([saved["results"]["cdm"][s]["curve"][1]["gen_swd"] for s in ("0", "1")]))
    # a curve point scores the first images of the same draws as the full evaluation
    from relaydiff.study import _final, _outputs
    for arm in ("relay-short", "cdm", "scratch-block"):
        a, run = ARMS[arm], saved["results"][arm]["0"]["run"]
        low = torch.rand(3, 3, 16, 16) * 2 - 1
        big = _outputs(a, _final(a, run, torch.device("cpu")), cfg, 0, torch.device("cpu"), 3, low, low)
        small = _outputs(a, _final(a, run, torch.device("cpu")), cfg, 0, torch.device("cpu"), 2, low, low)
        torch.testing.assert_close(small[0], big[0][:2], rtol=0, atol=1e-5)

    # resume: the recorded (arm, seed) results are kept, only the new arm trains
    stamp = (out / "runs" / "seed0" / "cdm" / "ema.pt").stat().st_mtime_ns
    run_study(_cfg(tmp_path, tiny_data, arms=("relay-short", "scratch-block", "cdm", "relay-white"), seeds=(0,)))
    assert (out / "runs" / "seed0" / "cdm" / "ema.pt").stat().st_mtime_ns == stamp
    again = json.loads((out / "study.json").read_text())
    assert again["results"]["cdm"] == saved["results"]["cdm"] and "0" in again["results"]["relay-white"]

    # extended after seed 0's run folders were removed (only study.json moved with it): the
    # sheets come from the first seed whose images remain, and nothing recorded is lost
    shutil.rmtree(out / "runs" / "seed0")
    (out / "samples.png").unlink()
    run_study(_cfg(tmp_path, tiny_data, arms=("relay-short", "cdm"), seeds=(0, 1, 2)))
    extended = json.loads((out / "study.json").read_text())
    assert extended["results"]["cdm"]["0"] == saved["results"]["cdm"]["0"]
    assert set(extended["results"]["cdm"]) == {"0", "1", "2"} and (out / "samples.png").is_file()

    with pytest.raises(StudyError, match="other settings"):
        run_study(StudyConfig(out=str(out), minutes=1.0, data=tiny_data[0], heldout=tiny_data[1], quiet=True))


def test_bad_settings(tmp_path, tiny_data):
    with pytest.raises(StudyError, match="arms"):
        run_study(_cfg(tmp_path, tiny_data, arms=("nope",)))
    with pytest.raises(StudyError, match="one budget"):
        run_study(StudyConfig(out=str(tmp_path / "x")))
    with pytest.raises(StudyError, match="heldout"):
        run_study(StudyConfig(out=str(tmp_path / "x"), minutes=1.0, data=tiny_data[0]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(StudyError, match="no study.json"):
        run_study(StudyConfig(out=str(tmp_path / "full"), smoke=True, data=tiny_data[0], heldout=tiny_data[1]))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from relaydiff.cli import main
    assert main(["study", "--out", str(tmp_path / "o"), "--seeds", "0,0", "--smoke"]) == 2
    assert main(["study", "--out", str(tmp_path / "o")]) == 2
    assert main(["study", "--smoke", "--arms", "relay,bogus", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("relaydiff study: error:") for line in err)
