"""EDM's other networks and preconditioners (relaydiff/models/songunet.py, precond.py) and float64
through every network.

The oracle is EDM's math written out functionally in float64 from a state dict: resampling as
EDM's transposed / strided depthwise convolutions with the filter buffer, attention with
explicit einsums, the preconditioners from their closed forms (VP's ``t(sigma)`` by root finding,
iDDPM's level by brute-force nearest search). Which layer resamples is read from EDM's key
names (``_down``, ``_up``, ``_aux_residual`` ...), not from relaydiff's modules.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

from relaydiff.models import (DhariwalUNet, EDMPrecond, SongUNet, VEPrecond, VPPrecond, build_model,
                              count_parameters, iDDPMPrecond)
from relaydiff.models.precond import iddpm_levels
from relaydiff.models.songunet import FourierEmbedding
from relaydiff.models.unet import Conv2d, PositionalEmbedding

from test_convert import one_thread  # noqa: F401  (autouse: 8px images run faster on one thread)
from test_models import randomize_

DDPMPP = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, augment_dim=9, model_channels=16,
              channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1, attn_resolutions=(4,), dropout=0.0)
NCSNPP = dict(DDPMPP, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
              resample_filter=(1, 3, 3, 1))
SKIP = dict(DDPMPP, encoder_type="skip", decoder_type="skip", resample_filter=(1, 3, 3, 1))
ADM = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, augment_dim=9, model_channels=64,
           channel_mult=(1, 1), channel_mult_emb=1, num_blocks=1, attn_resolutions=(4,), dropout=0.0)


# ----------------------------------------------------------------------------- the float64 oracle

def _gn(sd, p, x, eps):
    return F.group_norm(x, min(32, x.shape[1] // 4), sd[p + ".weight"], sd[p + ".bias"], eps)


def _conv(sd, p, x, up=False, down=False, fused=False):
    """EDM's Conv2d: resampling by the filter buffer ``f`` (transposed conv with 4 f / strided
    depthwise conv), 'same' padding, the bias added last."""
    w, b, f = sd.get(p + ".weight"), sd.get(p + ".bias"), sd.get(p + ".resample_filter")
    w_pad = w.shape[-1] // 2 if w is not None else 0
    f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
    if fused:
        x = F.conv2d(x, w, padding=w_pad + f_pad)
        x = F.conv2d(x, f.tile(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2)
    else:
        c = x.shape[1]
        if up:
            x = F.conv_transpose2d(x, (4 * f).tile(c, 1, 1, 1), groups=c, stride=2, padding=f_pad)
        if down:
            x = F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, padding=w_pad)
    return x if b is None else x + b.reshape(1, -1, 1, 1)


def _block(sd, p, x, emb, song: bool, up=False, down=False):
    """EDM's UNetBlock: ADM (``song=False``: scale-shift, eps 1e-5, 64 channels per head) or
    DDPM++/NCSN++ (additive conditioning, eps 1e-6, one head, skip scale sqrt(1/2))."""
    eps, skip_scale = (1e-6, math.sqrt(0.5)) if song else (1e-5, 1.0)
    orig = x
    x = _conv(sd, p + ".conv0", F.silu(_gn(sd, p + ".norm0", x, eps)), up, down)
    params = F.linear(emb, sd[p + ".affine.weight"], sd[p + ".affine.bias"])[:, :, None, None]
    if song:
        x = F.silu(_gn(sd, p + ".norm1", x + params, eps))
    else:
        scale, shift = params.chunk(2, dim=1)
        x = F.silu(shift + _gn(sd, p + ".norm1", x, eps) * (scale + 1))
    x = _conv(sd, p + ".conv1", x)
    has_skip = any(k.startswith(p + ".skip.") for k in sd)
    x = (x + (_conv(sd, p + ".skip", orig, up, down) if has_skip else orig)) * skip_scale
    if p + ".qkv.weight" in sd:
        b, c, h, w = x.shape
        heads = 1 if song else c // 64
        q, k, v = _conv(sd, p + ".qkv", _gn(sd, p + ".norm2", x, eps)).reshape(b * heads, c // heads, 3, -1).unbind(2)
        a = torch.einsum("nqk,nck->ncq", torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(2), v)
        x = (_conv(sd, p + ".proj", a.reshape(b, c, h, w)) + x) * skip_scale
    return x


def _sinusoids(arg):
    return torch.cat([arg.cos(), arg.sin()], dim=1)


def songunet_oracle(sd, enc, dec, x, noise, labels=None, augment=None):
    """EDM's SongUNet.forward; ``enc``/``dec``: the ModuleDict keys in order."""
    if "map_noise.freqs" in sd:
        emb = _sinusoids(noise[:, None] * (2 * math.pi * sd["map_noise.freqs"])[None])
    else:
        half = sd["map_layer0.weight"].shape[1] // 2
        emb = _sinusoids(noise[:, None] * (1e-4 ** (torch.arange(half, dtype=x.dtype) / (half - 1)))[None])
    emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1)
    if labels is not None:
        emb = emb + F.linear(labels * math.sqrt(labels.shape[1]), sd["map_label.weight"], sd["map_label.bias"])
    if augment is not None:
        emb = emb + F.linear(augment, sd["map_augment.weight"])
    emb = F.silu(F.linear(F.silu(F.linear(emb, sd["map_layer0.weight"], sd["map_layer0.bias"])),
                          sd["map_layer1.weight"], sd["map_layer1.bias"]))
    skips, aux = [], x
    for name in enc:
        p = "enc." + name
        if name.endswith("_aux_down"):
            aux = _conv(sd, p, aux, down=True)
        elif name.endswith("_aux_skip"):
            x = skips[-1] = x + _conv(sd, p, aux)
        elif name.endswith("_aux_residual"):
            x = skips[-1] = aux = (x + _conv(sd, p, aux, fused=True)) / math.sqrt(2)
        else:
            x = _conv(sd, p, x) if name.endswith("_conv") else _block(sd, p, x, emb, True, down=name.endswith("_down"))
            skips.append(x)
    aux = tmp = None
    for name in dec:
        p = "dec." + name
        if name.endswith("_aux_up"):
            aux = _conv(sd, p, aux, up=True)
        elif name.endswith("_aux_norm"):
            tmp = _gn(sd, p, x, 1e-6)
        elif name.endswith("_aux_conv"):
            tmp = _conv(sd, p, F.silu(tmp))
            aux = tmp if aux is None else tmp + aux
        else:
            if x.shape[1] != sd[p + ".norm0.weight"].shape[0]:
                x = torch.cat([x, skips.pop()], dim=1)
            x = _block(sd, p, x, emb, True, up=name.endswith("_up"))
    return aux


def dhariwal_oracle(sd, enc, dec, x, noise, labels=None, augment=None):
    """EDM's DhariwalUNet.forward."""
    half = sd["map_layer0.weight"].shape[1] // 2
    emb = _sinusoids(noise[:, None] * (1e-4 ** (torch.arange(half, dtype=x.dtype) / half))[None])
    if augment is not None:
        emb = emb + F.linear(augment, sd["map_augment.weight"])
    emb = F.linear(F.silu(F.linear(emb, sd["map_layer0.weight"], sd["map_layer0.bias"])),
                   sd["map_layer1.weight"], sd["map_layer1.bias"])
    if labels is not None:
        emb = emb + F.linear(labels, sd["map_label.weight"])
    emb = F.silu(emb)
    skips = []
    for name in enc:
        p = "enc." + name
        x = _conv(sd, p, x) if name.endswith("_conv") else _block(sd, p, x, emb, False, down=name.endswith("_down"))
        skips.append(x)
    for name in dec:
        p = "dec." + name
        if x.shape[1] != sd[p + ".norm0.weight"].shape[0]:
            x = torch.cat([x, skips.pop()], dim=1)
        x = _block(sd, p, x, emb, False, up=name.endswith("_up"))
    return _conv(sd, "out_conv", F.silu(_gn(sd, "out_norm", x, 1e-5)))


def vp_t(sigma: float, beta_d: float, beta_min: float) -> float:
    """VP's t(sigma), by root finding on sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return scipy.optimize.brentq(lambda t: math.sqrt(math.expm1(0.5 * beta_d * t * t + beta_min * t)) - sigma,
                                 0.0, 2.0, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)


def precond_oracle(kind: str, cfg: dict, u, net_fn, x, sigma, labels=None):
    """EDM's ``D(x; sigma)`` for ``kind`` in EDMPrecond / VPPrecond / VEPrecond / iDDPMPrecond,
    float64; ``net_fn(x_in, c_noise, labels)`` is the network, ``u`` iDDPM's level table."""
    s = sigma.reshape(-1, 1, 1, 1)
    if kind == "EDMPrecond":
        sd = cfg.get("sigma_data", 0.5)
        c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log() / 4
    elif kind == "VEPrecond":
        c_skip, c_out, c_in, c_noise = 1.0, s, 1.0, (sigma / 2).log()
    else:
        c_skip, c_out, c_in = 1.0, -s, 1 / (s ** 2 + 1).sqrt()
        if kind == "VPPrecond":
            c_noise = torch.tensor([(cfg["M"] - 1) * vp_t(v, cfg["beta_d"], cfg["beta_min"]) for v in sigma.tolist()],
                                   dtype=x.dtype)
        else:
            table = u.double().tolist()
            nearest = [min(range(len(table)), key=lambda j: abs(v - table[j])) for v in sigma.tolist()]
            c_noise = torch.tensor([cfg["M"] - 1 - j for j in nearest], dtype=x.dtype)
    f = net_fn(c_in * x, c_noise, labels)
    return c_skip * x + c_out * f[:, :x.shape[1]]


def oracle_for(net):
    """``net_fn`` of :func:`precond_oracle` for a SongUNet / DhariwalUNet's current weights (float64)."""
    sd = {k: v.double() for k, v in net.state_dict().items()}
    fn = songunet_oracle if isinstance(net, SongUNet) else dhariwal_oracle
    return lambda x, noise, labels: fn(sd, list(net.enc), list(net.dec), x, noise, labels)


def _inputs(b=2, label_dim=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 8, 8, generator=g, dtype=dtype)
    sigma = torch.exp(torch.randn(b, generator=g, dtype=dtype) * 1.2 - 1.2)
    labels = torch.eye(label_dim, dtype=dtype)[torch.randint(0, label_dim, (b,), generator=g)] if label_dim else None
    return x, sigma, labels


def _song(cfg, seed=0):
    torch.manual_seed(seed)
    return randomize_(SongUNet(**cfg), seed).double().eval()


# ----------------------------------------------------------------------------- SongUNet layout

def test_songunet_state_dict_follows_edm_names_and_shapes():
    # hand-derived from EDM's SongUNet for DDPM++ (16 channels, mult 1,2, emb 32, attention at
    # 4x4), NCSN++ (Fourier noise embedding of 32, residual encoder, [1,3,3,1] filter) and the
    # skip encoder/decoder
    common = {
        "map_label.weight": (16, 4), "map_label.bias": (16,), "map_augment.weight": (16, 9),
        "map_layer0.weight": (32, 16), "map_layer1.weight": (32, 32), "enc.8x8_conv.weight": (16, 3, 3, 3),
        "enc.8x8_block0.affine.weight": (16, 32), "enc.8x8_block0.conv1.weight": (16, 16, 3, 3),
        "enc.4x4_down.conv0.resample_filter": (1, 1, 2, 2), "enc.4x4_down.skip.weight": (16, 16, 1, 1),
        "enc.4x4_block0.skip.weight": (32, 16, 1, 1), "enc.4x4_block0.qkv.weight": (96, 32, 1, 1),
        "dec.4x4_in0.qkv.weight": (96, 32, 1, 1), "dec.4x4_block0.conv0.weight": (32, 64, 3, 3),
        "dec.4x4_block1.conv0.weight": (32, 48, 3, 3), "dec.4x4_block1.qkv.weight": (96, 32, 1, 1),
        "dec.8x8_up.skip.weight": (32, 32, 1, 1), "dec.8x8_block0.conv0.weight": (16, 48, 3, 3),
        "dec.8x8_block1.conv0.weight": (16, 32, 3, 3), "dec.8x8_aux_norm.weight": (16,),
        "dec.8x8_aux_conv.weight": (3, 16, 3, 3),
    }
    absent = ["dec.4x4_in1.qkv.weight", "dec.4x4_block0.qkv.weight", "enc.8x8_block0.skip.weight",
              "out_conv.weight", "map_noise.freqs", "dec.4x4_aux_conv.weight"]
    cases = [
        (DDPMPP, common, absent),
        (NCSNPP, {**common, "map_noise.freqs": (16,), "map_label.weight": (32, 4), "map_label.bias": (32,),
                  "map_layer0.weight": (32, 32),
                  "map_augment.weight": (32, 9), "enc.4x4_aux_residual.weight": (16, 3, 3, 3),
                  "enc.4x4_aux_residual.resample_filter": (1, 1, 4, 4),
                  "enc.4x4_down.conv0.resample_filter": (1, 1, 4, 4),
                  "dec.8x8_up.conv0.resample_filter": (1, 1, 4, 4)}, absent[:-2] + ["enc.4x4_aux_skip.weight"]),
        (SKIP, {**common, "enc.4x4_down.conv0.resample_filter": (1, 1, 4, 4),
                "enc.4x4_aux_down.resample_filter": (1, 1, 4, 4), "enc.4x4_aux_skip.weight": (16, 3, 1, 1),
                "dec.4x4_aux_conv.weight": (3, 32, 3, 3), "dec.4x4_aux_norm.weight": (32,),
                "dec.8x8_aux_up.resample_filter": (1, 1, 4, 4)}, absent[:-1] + ["dec.8x8_aux_up.weight"]),
    ]
    for cfg, expected, missing in cases:
        net = SongUNet(**cfg)
        sd = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        for k, shape in expected.items():
            assert sd.get(k) == shape, (k, sd.get(k), shape)
        for k in missing:
            assert k not in sd, k
        assert count_parameters(dict(cfg, model_type="SongUNet")) == sum(p.numel() for p in net.parameters())
    assert list(SongUNet(**NCSNPP).enc)[:4] == ["8x8_conv", "8x8_block0", "4x4_down", "4x4_aux_residual"]


def test_songunet_published_sizes():
    # EDM's CIFAR-10 DDPM++ (cond: 10 classes, augment_dim 9) is 55.7M parameters, as in the
    # paper's Table 7 ("56M"); the same network in NCSN++ form 56.4M
    ddpmpp = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=128,
                  channel_mult=[2, 2, 2], model_type="SongUNet")
    n = count_parameters(ddpmpp)
    assert 55.5e6 < n < 56e6, n
    ncsnpp = dict(ddpmpp, label_dim=0, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                  resample_filter=[1, 3, 3, 1])
    assert 56e6 < count_parameters(ncsnpp) < 57e6


def test_songunet_initialisation_follows_edm():
    torch.manual_seed(0)
    net = SongUNet(**DDPMPP)
    conv = net.enc["4x4_block0"].conv0              # xavier: bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (16 * 9 + 32 * 9))
    assert bound * 0.95 < conv.weight.abs().max() <= bound and torch.count_nonzero(conv.bias) == 0
    head = net.dec["8x8_aux_conv"]                  # 1e-5 x xavier
    assert head.weight.abs().max() <= 1e-5 * math.sqrt(6 / (16 * 9 + 3 * 9))
    qkv = net.enc["4x4_block0"].qkv
    assert qkv.weight.abs().max() <= math.sqrt(0.2) * math.sqrt(6 / (32 + 96)) < qkv.weight.abs().max() / 0.9
    torch.manual_seed(0)
    freqs = SongUNet(**NCSNPP).map_noise.freqs        # N(0, 16^2)
    assert 4 < freqs.std().item() < 40


@pytest.mark.parametrize("cfg", [DDPMPP, NCSNPP, SKIP], ids=["ddpm++", "ncsn++", "skip"])
def test_songunet_matches_edm_math_in_float64(cfg):
    net = _song(cfg)
    x, sigma, labels = _inputs()
    noise, augment = sigma.log() / 4, torch.randn(2, 9, dtype=torch.float64)
    sd = {k: v for k, v in net.state_dict().items()}
    ref = songunet_oracle(sd, list(net.enc), list(net.dec), x, noise, labels, augment)
    out = net(x, noise, labels, augment)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    # float32 on the same weights: the same function to float32 round-off
    out32 = net.float()(x.float(), noise.float(), labels.float(), augment.float())
    assert (out32.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_songunet_label_dropout_and_missing_labels():
    net = _song(dict(DDPMPP, label_dropout=1 - 1e-9)).train()
    x, sigma, labels = _inputs()
    torch.testing.assert_close(net(x, sigma, labels), net(x, sigma, torch.zeros_like(labels)))
    with pytest.raises(ValueError, match="class_labels"):
        net(x, sigma)
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(**dict(DDPMPP, encoder_type="progressive"))


# ----------------------------------------------------------------------------- resampling and embeddings

def test_resample_filter_1331_by_hand():
    # an impulse at (2, 2): down (pad 1, stride 2) picks taps 1 and 3 of [1, 3, 3, 1] / 8 per axis,
    # up spreads 4 f around the doubled position
    x = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    x[0, 0, 2, 2] = 1.0
    down = Conv2d(1, 1, kernel=0, down=True, resample_filter=(1, 3, 3, 1)).double()
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[:2, :2] = torch.tensor([[1 / 64, 3 / 64], [3 / 64, 9 / 64]])
    torch.testing.assert_close(down(x)[0, 0], expected, rtol=0, atol=1e-15)
    up = Conv2d(1, 1, kernel=0, up=True, resample_filter=(1, 3, 3, 1)).double()
    y = up(x)[0, 0]
    # output (i, j) = 4 f[i - 2*2 + 1, j - 2*2 + 1]: rows/columns 3..6 hold [1, 3, 3, 1]/8 x 2
    taps = torch.tensor([1, 3, 3, 1], dtype=torch.float64) / 4
    assert y.shape == (12, 12)
    torch.testing.assert_close(y[3:7, 3:7], torch.outer(taps, taps), rtol=0, atol=1e-15)
    assert y.sum().item() == pytest.approx(4.0) and y[:3].abs().sum() == 0 and y[7:].abs().sum() == 0


@pytest.mark.parametrize("filt", [(1, 1), (1, 3, 3, 1)])
def test_resampling_convolutions_match_edm(filt):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for kw in (dict(down=True), dict(up=True), dict(down=True, fused_resample=True)):
        conv = randomize_(Conv2d(3, 5, kernel=3, resample_filter=filt, **kw)).double()
        sd = {"c." + k: v for k, v in conv.state_dict().items()}
        ref = _conv(sd, "c", x, up=kw.get("up", False), down=kw.get("down", False), fused="fused_resample" in kw)
        assert ref.shape[-1] == (16 if "up" in kw else 4)
        torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)
    # fused: the 3x3 convolution at the high resolution, then the filter (another function)
    fused = Conv2d(3, 5, kernel=3, down=True, resample_filter=filt, fused_resample=True).double()
    fused.load_state_dict(conv.state_dict())
    plain = Conv2d(3, 5, kernel=3, down=True, resample_filter=filt).double()
    plain.load_state_dict(conv.state_dict())
    assert not torch.allclose(fused(x), plain(x))


def test_embeddings_closed_form_in_float64():
    x = torch.tensor([-0.7, 0.0, 1.3], dtype=torch.float64)
    emb = PositionalEmbedding(8, endpoint=True)(x)
    f = torch.tensor([10000.0 ** (-i / 3) for i in range(4)], dtype=torch.float64)
    assert emb.dtype == torch.float64
    torch.testing.assert_close(emb, torch.cat([torch.cos(x[:, None] * f), torch.sin(x[:, None] * f)], 1),
                               rtol=1e-15, atol=1e-15)
    four = FourierEmbedding(6).double()
    arg = 2 * math.pi * x[:, None] * four.freqs[None]
    torch.testing.assert_close(four(x), torch.cat([arg.cos(), arg.sin()], 1), rtol=1e-15, atol=1e-15)
    assert PositionalEmbedding(8)(x.float()).dtype == torch.float32


# ----------------------------------------------------------------------------- preconditioners

class _Net(torch.nn.Module):
    """``F(x, c_noise) = tanh(x W + c_noise)``: a network whose input and c_noise both show in
    the output; ``out_mult`` 2 doubles the channels as iDDPM's network does."""

    def __init__(self, out_mult=1, label_dim=0):
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels, self.label_dim = 8, 3, 3 * out_mult, label_dim
        self.w = torch.nn.Parameter(torch.randn(8, 8) * 0.3)
        self.out_mult = out_mult

    def forward(self, x, noise, labels=None):
        y = torch.tanh(x @ self.w + noise.reshape(-1, 1, 1, 1))
        return torch.cat([y, -y], dim=1) if self.out_mult == 2 else y


@pytest.mark.parametrize("kind, cfg", [
    ("EDMPrecond", dict(sigma_data=0.5)), ("VPPrecond", dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)),
    ("VEPrecond", dict(sigma_min=0.02, sigma_max=100.0)), ("iDDPMPrecond", dict(C_1=0.001, C_2=0.008, M=1000))])
def test_preconditioners_match_closed_forms_in_float64(kind, cfg):
    torch.manual_seed(0)
    net = _Net(2 if kind == "iDDPMPrecond" else 1).double()
    pre = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond,
           "iDDPMPrecond": iDDPMPrecond}[kind](net, **cfg)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.05, 0.7, 9.0, 80.0], dtype=torch.float64)
    ref = precond_oracle(kind, cfg, getattr(pre, "u", None), lambda a, n, c: net(a, n), x, sigma)
    out = pre(x, sigma)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # float32 (the network's parameters float32): the same to float32 round-off of c_noise & co
    out32 = pre.float()(x.float(), sigma.float())
    assert out32.dtype == torch.float32
    assert (out32.double() - ref).abs().max() < 1e-3 * (1 + sigma.max())


def test_preconditioner_ranges_and_rounding():
    vp = VPPrecond(_Net())
    sig = lambda t: math.sqrt(math.exp(0.5 * 19.9 * t * t + 0.1 * t) - 1)   # noqa: E731
    assert vp.sigma_min == pytest.approx(sig(1e-5), rel=1e-9) and vp.sigma_max == pytest.approx(sig(1.0), rel=1e-12)
    assert 0.00099 < vp.sigma_min < 0.00101 and 152.1 < vp.sigma_max < 152.2
    ve = VEPrecond(_Net())
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    dd = iDDPMPrecond(_Net(2))
    u = dd.u
    assert u.dtype == torch.float32 and u.shape == (1001,) and u[-1] == 0 and bool((u[:-1] > u[1:]).all())
    assert (dd.sigma_min, dd.sigma_max) == (float(u[999]), float(u[0]))
    s = torch.tensor([0.5, 3.0, float(u[10]), 1e9], dtype=torch.float64)
    idx = dd.round_sigma(s, return_index=True)
    brute = [min(range(1001), key=lambda j: abs(v - float(u[j]))) for v in s.tolist()]
    assert idx.tolist() == brute and idx[2] == 10 and idx[3] == 0
    assert dd.round_sigma(s).dtype == torch.float64 and torch.equal(dd.round_sigma(s), u.double()[idx])
    with pytest.raises(ValueError, match="2 x 3 output channels"):
        iDDPMPrecond(_Net(1))


def test_iddpm_levels_recurrence():
    # float64 against the recurrence in Python floats; float32 against it evaluated one scalar
    # tensor at a time as EDM does (bit for bit), which is ~5e-4 off the exact table
    M, C_1, C_2 = 1000, 0.001, 0.008
    abar = [math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2 for j in range(M + 1)]
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar[j - 1] / abar[j], C_1) - 1)
    torch.testing.assert_close(iddpm_levels(), torch.tensor(u, dtype=torch.float64), rtol=1e-12, atol=0)

    def ab32(j):
        return (0.5 * np.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2
    u32 = torch.zeros(M + 1)
    for j in range(M, 0, -1):
        u32[j - 1] = ((u32[j] ** 2 + 1) / (ab32(j - 1) / ab32(j)).clip(min=C_1) - 1).sqrt()
    assert torch.equal(iddpm_levels(dtype=torch.float32), u32)
    assert 1e-4 < ((u32.double() - torch.tensor(u)) / torch.tensor(u)).abs()[:M].max() < 1e-3


@pytest.mark.parametrize("precond, network", [
    (dict(), dict(DDPMPP, model_type="SongUNet")),
    (dict(class_name="VPPrecond"), dict(DDPMPP, model_type="SongUNet", label_dim=0)),
    (dict(class_name="VEPrecond", sigma_min=0.02, sigma_max=100.0), dict(NCSNPP, model_type="SongUNet", label_dim=0)),
    (dict(class_name="iDDPMPrecond"), dict(ADM, out_channels=6)),
], ids=["edm-songunet", "vp", "ve", "iddpm"])
def test_build_model_round_trips_config(precond, network):
    model = build_model(network, precond)
    assert type(model).__name__ == precond.get("class_name", "EDMPrecond")
    assert type(model.model).__name__ == network.get("model_type", "DhariwalUNet")
    again = build_model(network, model.config())
    assert again.config() == model.config()
    assert sorted(again.state_dict()) == sorted(model.state_dict())
    with pytest.raises(ValueError, match="unknown preconditioner"):
        build_model(network, dict(class_name="FlowPrecond"))


# ----------------------------------------------------------------------------- float64 end to end

@pytest.mark.parametrize("kind", ["edm-adm", "vp-ddpm++", "ve-ncsn++", "iddpm-adm"])
def test_denoisers_run_in_float64_and_pass_gradcheck(kind):
    """Every preconditioner around every network in float64: the forward equals the oracle to
    1e-11, and autograd's gradients (input and, where c_noise is smooth, sigma) pass
    ``gradcheck``, which fails if any layer computes below float64."""
    torch.manual_seed(0)
    small = dict(img_resolution=4, in_channels=3, out_channels=6 if kind.startswith("iddpm") else 3, label_dim=2,
                 dropout=0.0, num_blocks=1)
    if kind.endswith("adm"):
        net = DhariwalUNet(**small, model_channels=64, channel_mult=(1,), channel_mult_emb=1, attn_resolutions=(4,))
    else:
        extra = NCSNPP if kind.startswith("ve") else DDPMPP
        song = {k: v for k, v in extra.items() if k in ("embedding_type", "channel_mult_noise", "encoder_type",
                                                         "resample_filter")}
        net = SongUNet(**small, model_channels=8, channel_mult=(1, 1), channel_mult_emb=2, attn_resolutions=(2,),
                       **song)
    pre = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": iDDPMPrecond}[kind.split("-")[0]](net)
    pre = randomize_(pre, 1).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.8], dtype=torch.float64, requires_grad=not kind.startswith("iddpm"))
    labels = torch.tensor([[0.0, 1.0]], dtype=torch.float64)

    out = pre(x, sigma, labels)
    assert out.dtype == torch.float64
    ref = precond_oracle(type(pre).__name__, pre.config(), getattr(pre, "u", None),
                         oracle_for(net), x.detach(), sigma.detach(), labels)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-11, atol=1e-11)
    inputs = (x, sigma) if sigma.requires_grad else (x,)
    fn = (lambda a, s: pre(a, s, labels)) if sigma.requires_grad else (lambda a: pre(a, sigma, labels))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
