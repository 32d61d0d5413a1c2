"""relaydiff study: the arms train what they claim to, every arm runs end to end in a smoke study
(engine and CLI, with and without Inception weights), which writes its outputs and resumes."""
from __future__ import annotations

import json
import math
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from relaydiff.images import save_png
from relaydiff.study import (ARMS, StudyConfig, StudyError, build_cdm, curve_summary, run_study, stage_config,
                             t_interval, t_quantile)


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


def _patch_detail(x: torch.Tensor) -> torch.Tensor:
    """``x`` minus its 4 x 4 patch means (every patch-DCT coefficient but the DC one)."""
    return x - F.avg_pool2d(x, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)


def test_cogview3_blurs_linearly_and_relay_by_dct():
    """The blur of each cascade arm's training corruption, seen through two images corrupted
    with the same sigma and noise (the noise cancels in the difference ``D = Blur(x - y)``).
    CogView3's linear blur ``(1 - c) d + c L(d)`` keeps every patch mean and scales all the
    rest of ``d`` by one factor ``1 - (1 - m) w(t)``; the DCT blur damps high frequencies more
    than low ones, so what it leaves is not a multiple of ``d``'s detail."""
    from relaydiff.diffusion import RelayLoss
    cfg = StudyConfig(out="unused", smoke=True)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(16, 3, 32, 32, dtype=torch.float64, generator=g) for _ in range(2))
    d = _patch_detail(x - y)
    for arm in ("cogview3", "relay", "relay-white", "relay-short"):
        relay = stage_config(arm, "relay", cfg, "data.zip", "run", 0).resolved().relay
        loss = RelayLoss(relay)
        torch.manual_seed(0)
        xt, sigma = loss.corrupt(x)
        torch.manual_seed(0)
        yt, sigma_y = loss.corrupt(y)
        assert torch.equal(sigma, sigma_y)
        diff = xt - yt
        torch.testing.assert_close(F.avg_pool2d(diff, 4), F.avg_pool2d(x - y, 4), rtol=0, atol=1e-12)
        detail = _patch_detail(diff)
        scale = (detail * d).sum((1, 2, 3)) / (d * d).sum((1, 2, 3))
        residual = (detail - scale.view(-1, 1, 1, 1) * d).flatten(1).norm(dim=1) / detail.flatten(1).norm(dim=1)
        if arm == "cogview3":
            assert residual.max() < 1e-12, residual
            w = relay.blur_of_sigma(sigma).double()     # the weight w(t) = t of the sampled sigma
            torch.testing.assert_close(scale, 1 - (1 - relay.min_scale) * w, rtol=0, atol=1e-6)
        else:   # the DCT blur: at least 5% of the detail's norm is not a multiple of it, every sample
            assert residual.min() > 0.05, (arm, residual)


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


def test_t_interval_matches_closed_form(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)         # a core install has no scipy
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    v = [1.0, 2.0, 4.0]
    r = t_interval(v)
    # t_{0.975, 2} = 4.302653; s = sqrt(7/3)
    assert r["mean"] == pytest.approx(7 / 3) and r["half"] == pytest.approx(4.302653 * (7 / 3) ** 0.5 / 3 ** 0.5,
                                                                           rel=1e-6)
    assert t_interval([3.0])["half"] is None


def test_study_fid_matches_the_symmetric_root():
    """The study's FID (nuclear norm of the centred features' cross product when N < D) against
    tr sqrt(S1^1/2 S2 S1^1/2) from symmetric eigendecompositions; 0 for a set with itself."""
    from relaydiff.metrics import FeatureStats, gaussian_stats
    from relaydiff.study import _fid
    rng = np.random.default_rng(0)

    def stats(f):
        return FeatureStats(*gaussian_stats(f), pool=f, n=len(f))

    x, y = rng.standard_normal((20, 64)), 1.3 * rng.standard_normal((25, 64)) + 0.2
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(w.clip(0))) @ v.T
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(r @ s2 @ r).clip(0)).sum()
    diff = x.mean(0) - y.mean(0)
    assert _fid(stats(x), stats(y)) == pytest.approx(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt,
                                                     rel=1e-7)
    assert abs(_fid(stats(x), stats(x))) < 1e-9 < _fid(stats(x), stats(x + 0.1))
    # N >= D: the Gaussian statistics' Fréchet distance
    from relaydiff.metrics import frechet_distance
    a, b = x[:, :8], y[:, :8]
    assert _fid(stats(a), stats(b)) == frechet_distance(*gaussian_stats(b), *gaussian_stats(a))


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    # closed forms: df 1 tan(pi (q - 1/2)), df 2 (2q - 1) / sqrt(2 q (1 - q))
    assert t_quantile(0.975, 1) == pytest.approx(12.706204736174707, rel=1e-14)
    assert t_quantile(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-14)
    worst = 0.0
    for df in range(1, 201):
        for q in (0.975, 0.025, 0.9, 0.995, 0.9995):
            want = float(stats.t.ppf(q, df))
            worst = max(worst, abs(t_quantile(q, df) - want) / abs(want))
    assert worst < 1e-10, worst
    assert t_quantile(0.975, 10 ** 5) == pytest.approx(float(stats.t.ppf(0.975, 10 ** 5)), rel=1e-10)
    assert t_quantile(0.5, 7) == 0.0
    for bad in ((0.975, 0), (0.975, 2.5), (1.0, 3), (0.0, 3)):
        with pytest.raises(ValueError):
            t_quantile(*bad)


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


# ------------------------------------------------------------- the CLI and Inception metrics

@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A state dict of the TF Inception with He-scaled random weights (no classifier): loads
    through ``--inception`` like the real weights, gives non-degenerate 2048-d features."""
    from relaydiff.metrics import InceptionLayers
    from relaydiff.metrics.inception import ConvBN
    layers = InceptionLayers()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in layers.modules():
            if isinstance(m, ConvBN):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / m.weight[0].numel()))
                m.beta.copy_(0.1 * torch.randn(m.beta.shape, generator=g))
    path = tmp_path_factory.mktemp("inception") / "random_inception.pt"
    torch.save({"layers." + k: v for k, v in layers.state_dict().items()}, path)
    return str(path)


def test_cli_smoke_study_with_inception(tmp_path, tiny_data, random_inception, capsys, monkeypatch):
    """``relaydiff study`` to completion for the arms the engine test does not train (relay,
    cogview3, scratch) with ``--inception``: exit 0, the table printed, the files written, and
    FID / KID recomputed independently from the saved samples and held-out images. scipy is
    hidden (an optional dependency: the intervals and the study's FID do without it)."""
    from relaydiff.cli import main
    from relaydiff.images import list_images, load_image
    from relaydiff.metrics import load_inception
    for name in ["scipy"] + [m for m in sys.modules if m.startswith("scipy.")]:
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "cli_study"
    args = ["study", "--smoke", "--arms", "relay,cogview3,scratch", "--seeds", "0,", "--data", tiny_data[0],
            "--heldout", tiny_data[1], "--inception", random_inception, "--device", "cpu", "--quiet",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0]
    assert header.startswith("| arm | seeds | gen SWD | gen FID | gen KID | SR PSNR dB |"), header
    for arm in ("relay", "cogview3", "scratch"):
        assert f"| {arm} | 1 |" in printed
    assert "Paired differences, arm minus `relay`" in printed and "Δ gen KID" in printed
    files = ["study.json", "study.md", "superres.png", "samples.png", "metrics.png", "loss.png", "curves.png"]
    assert printed.rstrip().endswith(f"relaydiff study: wrote {', '.join(files)} in {out}")
    assert all((out / f).is_file() for f in files)
    saved = json.loads((out / "study.json").read_text())
    assert saved["settings"]["inception"] == random_inception and saved["files"] == files
    assert set(saved["summary"]) == {"relay", "cogview3", "scratch"}

    # FID and KID of each arm from its saved samples, by closed forms for 2 images per set:
    # each covariance is rank one, S = u u^T with u = (f_1 - f_2) / sqrt(2), so
    # tr sqrt(S_1 S_2) = |u . v|; KID is the whole-set unbiased MMD^2 from the kernel's definition
    net = load_inception(random_inception)
    held = torch.from_numpy(np.stack([load_image(p) for p in list_images(tiny_data[1])])).permute(0, 3, 1, 2)
    ref = net(held.float())["pool"].double().numpy()
    assert ref.std(0).max() > 1e-3           # the random network's features are not degenerate
    for arm in ("relay", "cogview3", "scratch"):
        rec = saved["results"][arm]["0"]
        assert all(math.isfinite(rec[k]) for k in ("gen_fid", "gen_kid")) and rec["gen_fid"] >= 0, arm
        gen = torch.from_numpy(np.load(out / "runs" / "seed0" / arm / "images.npz")["gen"]).permute(0, 3, 1, 2)
        feat = net(gen.float())["pool"].double().numpy()
        u, v = (ref[0] - ref[1]) / math.sqrt(2), (feat[0] - feat[1]) / math.sqrt(2)
        diff = ref.mean(0) - feat.mean(0)
        fid = diff @ diff + u @ u + v @ v - 2 * abs(u @ v)
        assert rec["gen_fid"] == pytest.approx(fid, rel=1e-6), arm
        k = lambda u, v: (u @ v / u.size + 1.0) ** 3   # noqa: E731
        kid = k(ref[0], ref[1]) + k(feat[0], feat[1]) - 0.5 * sum(k(u, v) for u in ref for v in feat)
        assert rec["gen_kid"] == pytest.approx(kid, rel=1e-4, abs=1e-6), arm
        assert saved["summary"][arm]["gen_kid"]["mean"] == rec["gen_kid"]
    d = saved["results"]["scratch"]["0"]["gen_kid"] - saved["results"]["relay"]["0"]["gen_kid"]
    assert saved["paired"]["arms"]["scratch"]["gen_kid"]["mean"] == pytest.approx(d)

    # rerun: every result is recorded, nothing trains; without matplotlib the plots are skipped
    # with a one-line notice and the sheets are still written
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    stamp = (out / "study.md").stat().st_mtime_ns
    assert main(args) == 0
    captured = capsys.readouterr()
    notice = [ln for ln in captured.err.splitlines() if "matplotlib" in ln]
    assert notice == ["relaydiff study: no metrics.png, loss.png, curves.png: matplotlib is not installed "
                      "(pip install 'relaydiff[demo]')"]
    assert captured.out.rstrip().endswith("wrote study.json, study.md, superres.png, samples.png in " + str(out))
    assert json.loads((out / "study.json").read_text())["results"] == saved["results"]
    assert (out / "study.md").stat().st_mtime_ns >= stamp

    # a study written by version 2 (before KID, the exact FID and the every-neighbourhood SR SWD)
    # is not resumed: its results hold other numbers
    old = tmp_path / "old"
    old.mkdir()
    (old / "study.json").write_text(json.dumps({**saved, "settings": {**saved["settings"], "version": 2}}))
    with pytest.raises(StudyError, match="version: 2 there, 3 now"):
        run_study(StudyConfig(out=str(old), arms=("relay",), seeds=(0,), smoke=True, data=tiny_data[0],
                              heldout=tiny_data[1], inception=random_inception, device="cpu", quiet=True))
    # a bad weights file is refused before anything is written
    with pytest.raises(StudyError, match="does not exist"):
        run_study(StudyConfig(out=str(tmp_path / "none"), smoke=True, data=tiny_data[0], heldout=tiny_data[1],
                              inception=str(tmp_path / "missing.pt"), quiet=True))
    assert not (tmp_path / "none").exists()
