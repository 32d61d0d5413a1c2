"""EDM's released network pickles as stage 1 (relaydiff.models.convert): files built with the
structure of each kind of release (the recorded constructor keywords of EDM's train.py, tiny widths),
converted and compared tensor by tensor and, in float64, with EDM's math (the oracle of
tests/test_edm_models.py), then sampled as the stage 1 of a relay stage, by the pipeline and by
``relaydiff sample``. Also the checks on
the embedded source: a modified architecture constant is refused, an unknown source warned about.
"""
from __future__ import annotations

import hashlib
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from relaydiff.cli import main as cli_main
from relaydiff.config import RelayConfig
from relaydiff.images import read_sample_manifest, to_uint8
from relaydiff.models import (ConversionError, DhariwalUNet, SongUNet, build_model, convert_checkpoint,
                              convert_release, load_model, load_pretrained, network_kwargs, read_meta, save_weights)
from relaydiff.models import convert as convert_module
from relaydiff.models.convert import UnknownSourceWarning
from relaydiff.models.precond import iddpm_levels
from relaydiff.pipeline import RelayPipeline
from relaydiff.sampling import EDMSampling, RelaySampling, SamplerPreset

from test_convert import _loss, edm_modules, one_thread, write_edm_pkl  # noqa: F401  (fixtures, EDM file writers)
from test_edm_models import oracle_for, precond_oracle
from test_models import randomize_

# EDM's train.py keywords per architecture, at tiny widths (8px, 16 or 64 channels)
DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[2, 2], num_blocks=1,
              attn_resolutions=[4], dropout=0.13)
NCSNPP = dict(DDPMPP, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1])
ADM = dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
           dropout=0.1)
COMMON = dict(img_resolution=8, img_channels=3, use_fp16=False)

# name: (preconditioner, recorded keywords), after EDM's README list of released pickles
RELEASES = {
    "edm-cifar10-32x32-cond-vp": ("EDMPrecond", dict(COMMON, label_dim=4, augment_dim=9, **DDPMPP)),
    "edm-afhqv2-64x64-uncond-ve": ("EDMPrecond", dict(COMMON, label_dim=0, augment_dim=9, **dict(NCSNPP, dropout=0.25,
                                                                                               channel_mult=[1, 2]))),
    "edm-ffhq-64x64-uncond-vp": ("EDMPrecond", dict(COMMON, label_dim=0, augment_dim=9, **dict(DDPMPP, dropout=0.05,
                                                                                             channel_mult=[1, 2]))),
    "baseline-cifar10-32x32-uncond-vp": ("VPPrecond", dict(COMMON, label_dim=0, beta_d=19.9, beta_min=0.1, M=1000,
                                                           epsilon_t=1e-5, **DDPMPP)),
    "baseline-cifar10-32x32-uncond-ve": ("VEPrecond", dict(COMMON, label_dim=0, sigma_min=0.02, sigma_max=100,
                                                           **NCSNPP)),
    "baseline-imagenet-64x64-cond-adm": ("iDDPMPrecond", dict(COMMON, label_dim=4, C_1=0.001, C_2=0.008, M=1000,
                                                              **ADM)),
}
_OWN = {"EDMPrecond": ("sigma_min", "sigma_max", "sigma_data"), "VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t"),
        "VEPrecond": ("sigma_min", "sigma_max"), "iDDPMPrecond": ("C_1", "C_2", "M")}


def _standin(class_name: str):
    """A module named like EDM's preconditioner with its constructor and attributes, around
    relaydiff's network (what the pickle records; its forward is never used)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type="SongUNet",
                 **kwargs):
        torch.nn.Module.__init__(self)
        own = {k: kwargs.pop(k) for k in _OWN[class_name] if k in kwargs}
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = (img_resolution, img_channels,
                                                                                 label_dim, use_fp16)
        self.__dict__.update(own)
        out = img_channels * (2 if class_name == "iDDPMPrecond" else 1)
        net = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[model_type]
        self.model = net(img_resolution=img_resolution, in_channels=img_channels, out_channels=out,
                         label_dim=label_dim, **kwargs)
        if class_name == "iDDPMPrecond":
            self.register_buffer("u", iddpm_levels(own.get("M", 1000), own.get("C_1", 0.001), own.get("C_2", 0.008),
                                                   torch.float32))

    return type(class_name, (torch.nn.Module,), {"__init__": __init__})


def release_network(name: str, seed: int = 0, **changes):
    """The stand-in of release ``name`` with every parameter random, and its recorded keywords."""
    cls_name, kwargs = RELEASES[name]
    kwargs = {**kwargs, **changes}
    torch.manual_seed(seed)
    net = randomize_(_standin(cls_name)(**kwargs), seed)
    return net.eval().requires_grad_(False), cls_name, kwargs


def _inputs(label_dim, seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.randn(b, generator=g, dtype=torch.float64) * 1.2 - 1.2)
    labels = torch.eye(label_dim, dtype=torch.float64)[torch.arange(b) % label_dim] if label_dim else None
    return x, sigma, labels


def _convert(path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, meta = convert_release(path, **kw)
    return model, meta, [w for w in caught if issubclass(w.category, UnknownSourceWarning)]


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_converts_and_matches_edm_math(tmp_path, edm_modules, name):
    net, cls_name, kwargs = release_network(name)
    # the loss says base (EDMLoss, VPLoss, VELoss), or nothing does but the preconditioner
    loss = {"VPPrecond": _loss("VPLoss", "", beta_d=19.9, beta_min=0.1, epsilon_t=1e-5),
            "VEPrecond": _loss("VELoss", "", sigma_min=0.02, sigma_max=100)}.get(cls_name)
    extra = dict(loss_fn=None) if cls_name == "iDDPMPrecond" else None
    src = write_edm_pkl(tmp_path / f"{name}.pkl", net, kwargs, "# a network source\n", loss=loss, extra=extra)
    model, meta, caught = _convert(src)

    assert type(model).__name__ == cls_name and type(model.model).__name__ == kwargs["model_type"]
    assert meta["stage"] == "base" and meta["source"]["class_name"] == cls_name
    # the file describes itself: network keywords (model_type unless ADM) and preconditioner
    expected_net = {k: v for k, v in kwargs.items() if k not in (*COMMON, "label_dim", *_OWN[cls_name])}
    if expected_net["model_type"] == "DhariwalUNet":
        del expected_net["model_type"]
    assert {k: meta["network"][k] for k in expected_net} == expected_net
    assert meta["network"]["out_channels"] == (6 if cls_name == "iDDPMPrecond" else 3)
    own = {k: kwargs[k] for k in _OWN[cls_name] if k in kwargs}
    if cls_name == "EDMPrecond":   # EDM's defaults, written out
        assert meta["precond"] == dict(sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5)
    else:
        assert meta["precond"] == dict(class_name=cls_name, **own)
    # an unknown source: one warning, recorded in the metadata
    assert len(caught) == 1 and meta["source"]["known_source"] is None
    assert meta["source"]["warnings"] == [str(caught[0].message)]
    assert f"sha256 {meta['source']['module_src_sha256']}) is not one of the known" in str(caught[0].message)

    # every tensor by name, bit for bit (buffers included: resampling filters, iDDPM's u, Fourier freqs)
    got, want = model.state_dict(), net.state_dict()
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert torch.equal(got[k], t), k

    # the denoiser in float64 against EDM's preconditioner and network math
    x, sigma, labels = _inputs(net.label_dim)
    ref = precond_oracle(cls_name, dict(meta["precond"]), getattr(net, "u", None), oracle_for(net.model.double()),
                         x, sigma, labels)
    out = model.double()(x, sigma, labels)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # and in float32, as it samples
    out32 = model.float()(x.float(), sigma.float(), None if labels is None else labels.float())
    assert (out32.double() - ref).abs().max() <= 1e-3 * ref.abs().max()

    # written, read back, and loaded straight from the pickle
    with pytest.warns(UnknownSourceWarning):
        dst, meta2 = convert_checkpoint(src, tmp_path / f"{name}.safetensors")
    assert read_meta(dst) == meta2 | {"format": 1}
    with pytest.warns(UnknownSourceWarning):
        from_pickle = load_pretrained(src)
    for loaded, _ in (load_model(dst), from_pickle):
        assert type(loaded).__name__ == cls_name
        for k, t in want.items():
            assert torch.equal(loaded.state_dict()[k], t), k


@pytest.fixture(scope="module")
def relay32(tmp_path_factory):
    """A tiny relay stage for 8 -> 32 px (random weights; only that it runs matters here)."""
    net = network_kwargs("tiny", 32, label_dim=4)
    model = randomize_(build_model(net), 3)
    path = tmp_path_factory.mktemp("relay") / "relay32.safetensors"
    save_weights(path, {f"ema.{k}": v for k, v in model.state_dict().items()}, {
        "stage": "relay", "network": net, "precond": model.config(),
        "relay": RelayConfig(patch_size=4, block_size=4).to_dict(), "step": 0, "kimg": 0.0, "resolution": 32,
        "label_dim": 4})
    return path


def sample_argv(stage1, stage2, out, *flags) -> list[str]:
    """The arguments of ``relaydiff sample`` on the CPU with these checkpoints and ``flags``."""
    return ["sample", "--stage1", str(stage1), "--stage2", *map(str, stage2), "--out", str(out), "--device", "cpu",
            "--quiet", *flags]


def check_sample_folder(out, seeds, high, low=None, high_u8=None):
    """What ``relaydiff sample --seeds`` wrote to ``out``: one PNG per seed (and under low/ with
    --save-low), listed in the manifest, each the uint8 image of the pipeline's float ``high``
    (``high_u8``: the expected uint8 images instead) and ``low`` for the same seeds."""
    names = [f"{s:06d}.png" for s in seeds]
    assert read_sample_manifest(str(out)) == names
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == sorted(names)
    assert torch.isfinite(high).all() and float(high.std()) > 1e-3       # finite, not a constant image
    assert bool((high.abs() < 1).any())                                  # not clamped everywhere
    want = to_uint8(high) if high_u8 is None else high_u8
    for k, name in enumerate(names):
        img = np.asarray(Image.open(out / name))
        assert img.dtype == np.uint8 and img.shape == (*high.shape[2:], 3)
        assert np.array_equal(img, want[k]), name
        if low is not None:
            assert np.array_equal(np.asarray(Image.open(out / "low" / name)), to_uint8(low)[k]), name


@pytest.mark.parametrize("name", list(RELEASES))
def test_converted_release_is_a_stage1_of_the_pipeline_and_the_cli(tmp_path, edm_modules, relay32, name, capsys):
    """Each EDM release structure, converted with ``relaydiff convert``, as the stage 1 of a
    relay stage: through ``RelayPipeline`` and through ``relaydiff sample`` (the images it writes
    are the pipeline's for the same seeds)."""
    net, _, kwargs = release_network(name)
    src = write_edm_pkl(tmp_path / "src.pkl", net, kwargs, "")
    dst = tmp_path / "stage1.safetensors"
    assert cli_main(["convert", str(src), str(dst), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert f"{kwargs['model_type']} under {RELEASES[name][0]}" in out
    assert err.count("\n") == 1 and err.startswith("relaydiff convert: warning:") and "known released" in err

    # EDM's generate.py clamps the grid to the network's trained range
    stage1, _ = load_model(dst)
    lo, hi = max(0.002, stage1.sigma_min), min(80.0, stage1.sigma_max)
    preset = SamplerPreset(EDMSampling(steps=4, sigma_min=lo, sigma_max=hi), RelaySampling(steps=6))
    pipe = RelayPipeline.from_checkpoints(dst, relay32, sampler=preset)
    assert type(pipe.stage1).__name__ == RELEASES[name][0] and pipe.low_shape == (3, 8, 8)
    high, low = pipe.sample(2, seed=0, return_low=True, disable=True)
    assert high.shape == (2, 3, 32, 32) and low.shape == (2, 3, 8, 8)
    assert torch.isfinite(high).all() and torch.isfinite(low).all()

    # relaydiff sample with this stage 1 (per-image seeds: the same images in any batch)
    seeds = [0, 3, 7]
    out = tmp_path / "samples"
    rc = cli_main(sample_argv(dst, [relay32], out, "--seeds", "0,3,7", "--steps", "4,6", "--batch", "2",
                              "--save-low"))
    assert rc == 0, capsys.readouterr().err
    high, low = RelayPipeline.from_checkpoints(dst, relay32).sample(seeds=seeds, steps=(4, 6), return_low=True,
                                                                   disable=True)
    assert torch.isfinite(low).all() and float(low.std()) > 1e-3
    check_sample_folder(out, seeds, high, low)


def test_known_source_converts_silently(tmp_path, edm_modules, monkeypatch):
    source = "# the released networks.py\n"
    net, _, kwargs = release_network("baseline-cifar10-32x32-uncond-ve")
    src = write_edm_pkl(tmp_path / "ve.pkl", net, kwargs, source)
    monkeypatch.setitem(convert_module.KNOWN_SOURCES, hashlib.sha256(source.encode()).hexdigest(), "test release")
    _, meta, caught = _convert(src)
    assert caught == [] and meta["source"]["known_source"] == "test release" and "warnings" not in meta["source"]


@pytest.mark.parametrize("change, message", [
    ("heads", "num_heads"),        # DhariwalUNet with channels_per_head=32: same tensors, twice the heads
    ("eps", "eps"),                # a SongUNet GroupNorm epsilon other than 1e-6
    ("skip_scale", "skip_scale"),  # DDPM++ without the sqrt(1/2) skip scaling
    ("endpoint", "endpoint"),      # DDPM++'s positional embedding without its endpoint
    ("u", "iDDPM's noise levels"),  # an iDDPM table from other constants than the recorded C_1, C_2, M
])
def test_modified_architecture_constants_are_refused(tmp_path, edm_modules, change, message):
    name = "baseline-imagenet-64x64-cond-adm" if change in ("heads", "u") else "baseline-cifar10-32x32-uncond-vp"
    net, _, kwargs = release_network(name)
    if change == "heads":
        for m in net.model.modules():
            if getattr(m, "num_heads", 0):
                m.num_heads = m.out_channels // 32
    elif change == "eps":
        net.model.enc["8x8_block0"].norm1.eps = 1e-5
    elif change == "skip_scale":
        for m in net.model.modules():
            if hasattr(m, "skip_scale"):
                m.skip_scale = 1.0
    elif change == "endpoint":
        net.model.map_noise.endpoint = False
    else:
        net.u.copy_(iddpm_levels(1000, 0.002, 0.008, torch.float32))
    src = write_edm_pkl(tmp_path / "fork.pkl", net, kwargs, "")
    with pytest.raises(ConversionError, match=message) as err, warnings.catch_warnings():
        warnings.simplefilter("error", UnknownSourceWarning)   # refused before any warning
        convert_release(src)
    assert "\n" not in str(err.value)
