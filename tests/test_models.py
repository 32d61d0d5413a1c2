"""relaydiff.models: the ADM U-Net (EDM layout), EDM preconditioning, presets, weight files."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from relaydiff.models import (PRESETS, DhariwalUNet, EDMPrecond, build_model, count_parameters, load_model,
                              network_kwargs, preconditioning, read_meta, save_weights)
from relaydiff.models.checkpoint import atomic_write
from relaydiff.models.unet import Conv2d, PositionalEmbedding, UNetBlock


def small_unet(**kw) -> DhariwalUNet:
    args = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 2),
                channel_mult_emb=2, num_blocks=1, attn_resolutions=(8,), dropout=0.0)
    args.update(kw)
    return DhariwalUNet(**args)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised output layers included) with noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return module


# ----------------------------------------------------------------------------- presets

# published sizes: RDM paper Table 4 (295M / 553M); EDM's ImageNet-64 ADM is 295.9M
@pytest.mark.parametrize("name, label_dim, published", [
    ("imagenet64-base", 1000, 296e6), ("imagenet256-relay", 1000, 553e6),
    ("celebahq64-base", 0, 295e6), ("celebahq256-relay", 0, 553e6)])
def test_published_parameter_counts(name, label_dim, published):
    n = count_parameters(network_kwargs(name, label_dim=label_dim))
    print(f"{name}: {n:,} parameters ({n / 1e6:.1f}M; published ~{published / 1e6:.0f}M)")
    # the paper rounds to millions; the difference between class-conditional and
    # unconditional is the 1000 x emb label projection (0.8-1.0M), inside this 0.3%
    assert abs(n - published) / published < 3e-3


def test_small_presets_are_small():
    for res in (16, 64):
        n = count_parameters(network_kwargs("tiny", res))
        assert n < 1_000_000, n
    assert count_parameters(network_kwargs("small", 64)) < 10_000_000


def test_count_parameters_matches_a_real_model():
    kw = network_kwargs("tiny", 16, label_dim=3)
    assert count_parameters(kw) == sum(p.numel() for p in DhariwalUNet(**kw).parameters())


def test_presets_json_round_trip():
    for name in PRESETS:
        kw = network_kwargs(name)
        assert json.loads(json.dumps(kw)) == kw


# ----------------------------------------------------------------------------- U-Net layout

def test_state_dict_follows_edm_names_and_shapes():
    # hand-derived from EDM's DhariwalUNet for this configuration (model_channels 32,
    # mult 1,2,2, emb 64, 1 block, attention at 8x8, label_dim 10, augment_dim 9)
    net = small_unet(label_dim=10, augment_dim=9)
    sd = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = {
        "map_augment.weight": (32, 9), "map_layer0.weight": (64, 32), "map_layer0.bias": (64,),
        "map_layer1.weight": (64, 64), "map_label.weight": (64, 10),
        "enc.16x16_conv.weight": (32, 3, 3, 3), "enc.16x16_block0.norm0.weight": (32,),
        "enc.16x16_block0.affine.weight": (64, 64), "enc.16x16_block0.conv1.weight": (32, 32, 3, 3),
        "enc.8x8_down.conv0.weight": (32, 32, 3, 3), "enc.8x8_down.conv0.resample_filter": (1, 1, 2, 2),
        "enc.8x8_down.skip.resample_filter": (1, 1, 2, 2),
        "enc.8x8_block0.skip.weight": (64, 32, 1, 1), "enc.8x8_block0.qkv.weight": (192, 64, 1, 1),
        "enc.8x8_block0.proj.weight": (64, 64, 1, 1), "enc.8x8_block0.norm2.weight": (64,),
        "enc.4x4_down.conv0.weight": (64, 64, 3, 3), "enc.4x4_block0.conv0.weight": (64, 64, 3, 3),
        "dec.4x4_in0.qkv.weight": (192, 64, 1, 1), "dec.4x4_in1.conv0.weight": (64, 64, 3, 3),
        "dec.4x4_block0.conv0.weight": (64, 128, 3, 3), "dec.4x4_block1.skip.weight": (64, 128, 1, 1),
        "dec.8x8_up.conv0.resample_filter": (1, 1, 2, 2), "dec.8x8_up.skip.resample_filter": (1, 1, 2, 2),
        "dec.8x8_block0.qkv.weight": (192, 64, 1, 1), "dec.8x8_block1.conv0.weight": (64, 96, 3, 3),
        "dec.16x16_block1.conv0.weight": (32, 64, 3, 3), "out_norm.weight": (32,), "out_conv.weight": (3, 32, 3, 3),
    }
    for k, shape in expected.items():
        assert sd.get(k) == shape, (k, sd.get(k), shape)
    assert not any(k.startswith("map_noise") for k in sd)
    assert "dec.4x4_in1.qkv.weight" not in sd and "enc.16x16_block0.qkv.weight" not in sd
    assert "enc.8x8_down.skip.weight" not in sd   # in == out: the skip only resamples
    # 16: conv, block0; 8: down, block0; 4: down, block0 -> 6 skips; decoder 2 + 2 + 2 blocks + 2 middle + 2 up
    assert sum(1 for k in net.enc) == 6 and sum(1 for k in net.dec) == 10


def test_precond_state_dict_prefix_is_edms():
    net = build_model(network_kwargs("tiny", 16))
    assert all(k.startswith("model.") for k in net.state_dict())


def test_initialisation_follows_edm():
    torch.manual_seed(0)
    net = small_unet(label_dim=1000)
    for name in ("out_conv", "enc.16x16_block0.conv1", "enc.8x8_block0.proj"):
        m = net.get_submodule(name)
        assert torch.count_nonzero(m.weight) == 0 and torch.count_nonzero(m.bias) == 0
    w = net.map_label.weight
    assert abs(w.std().item() - 1.0) < 0.02 and abs(w.mean().item()) < 0.02   # N(0, 1), 64000 samples
    conv = net.get_submodule("enc.8x8_block0.conv0")
    bound = 1 / math.sqrt(32 * 9)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.95 * bound


@pytest.mark.parametrize("kw, shape", [
    (dict(), (2, 3, 16, 16)),
    (dict(label_dim=5), (3, 3, 16, 16)),
    (dict(in_channels=1, out_channels=2, channel_mult=(1, 2), img_resolution=8, attn_resolutions=(4,)), (2, 1, 8, 8)),
    (dict(img_resolution=32, channel_mult=(1, 1, 2, 2), num_blocks=2, attn_resolutions=(16, 8)), (1, 3, 32, 32)),
    (dict(augment_dim=9), (2, 3, 16, 16)),
])
def test_unet_forward_shapes(kw, shape):
    torch.manual_seed(0)
    net = randomize_(small_unet(**kw)).eval()
    b = shape[0]
    labels = F.one_hot(torch.arange(b) % 5, 5).float() if kw.get("label_dim") else None
    aug = torch.randn(b, 9) if kw.get("augment_dim") else None
    y = net(torch.randn(shape), torch.randn(b), labels, aug)
    assert y.shape == (b, net.out_channels) + shape[2:]
    assert torch.isfinite(y).all()


def test_unet_needs_labels_when_conditional():
    net = small_unet(label_dim=4)
    with pytest.raises(ValueError, match="class_labels"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1))


def test_unet_rejects_indivisible_resolution():
    with pytest.raises(ValueError, match="divisible"):
        small_unet(img_resolution=18)


def test_positional_embedding_closed_form():
    x = torch.tensor([-0.7, 0.0, 1.3])
    emb = PositionalEmbedding(8)(x)
    f = torch.tensor([10000.0 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(emb, torch.cat([torch.cos(x[:, None] * f), torch.sin(x[:, None] * f)], 1))


def test_resampling_equals_edms_filter_convolutions():
    x = torch.randn(2, 5, 8, 6, dtype=torch.float64)
    down = Conv2d(5, 5, kernel=0, down=True).double()
    up = Conv2d(5, 5, kernel=0, up=True).double()
    f = down.resample_filter
    # EDM: strided depthwise convolution with f (down), transposed with 4 f (up)
    torch.testing.assert_close(down(x), F.conv2d(x, f.tile(5, 1, 1, 1), groups=5, stride=2))
    torch.testing.assert_close(up(x), F.conv_transpose2d(x, f.mul(4).tile(5, 1, 1, 1), groups=5, stride=2))


def _edm_block_oracle(block: UNetBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """EDM's UNetBlock.forward written out in float64 with explicit einsum attention."""
    def gn(m, t):
        return F.group_norm(t, m.num_groups, m.weight, m.bias, m.eps)
    h = F.conv2d(F.silu(gn(block.norm0, x)), block.conv0.weight, block.conv0.bias, padding=1)
    params = F.linear(emb, block.affine.weight, block.affine.bias)[:, :, None, None]
    scale, shift = params.chunk(2, dim=1)
    h = F.silu(shift + gn(block.norm1, h) * (scale + 1))
    h = F.conv2d(h, block.conv1.weight, block.conv1.bias, padding=1)
    skip = F.conv2d(x, block.skip.weight, block.skip.bias) if block.skip is not None else x
    h = h + skip
    b, c, hh, ww = h.shape
    heads = block.num_heads
    qkv = F.conv2d(gn(block.norm2, h), block.qkv.weight, block.qkv.bias)
    q, k, v = qkv.reshape(b * heads, c // heads, 3, -1).unbind(2)
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v).reshape(b, c, hh, ww)
    return F.conv2d(a, block.proj.weight, block.proj.bias) + h


def test_attention_block_matches_edm_formula():
    torch.manual_seed(0)
    block = randomize_(UNetBlock(64, 128, emb_channels=32, attention=True)).double().eval()
    assert block.num_heads == 2
    x, emb = torch.randn(2, 64, 6, 5, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    torch.testing.assert_close(block(x, emb), _edm_block_oracle(block, x, emb), rtol=1e-10, atol=1e-10)


def test_network_label_dropout_gives_unconditional_output():
    torch.manual_seed(0)
    net = randomize_(small_unet(label_dim=3, label_dropout=1.0 - 1e-9)).train()
    x, noise = torch.randn(2, 3, 16, 16), torch.randn(2)
    dropped = net(x, noise, torch.eye(3)[:2])
    torch.testing.assert_close(dropped, net(x, noise, torch.zeros(2, 3)))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    net = randomize_(small_unet(label_dim=2)).train()
    x, noise, labels = torch.randn(2, 3, 16, 16), torch.randn(2), torch.eye(2)
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.gradient_checkpointing = ckpt
        net(x, noise, labels).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- preconditioning

class _Recorder(torch.nn.Module):
    """A network that returns ``tanh(linear(x))`` and records what it was given."""

    def __init__(self):
        super().__init__()
        self.img_resolution, self.in_channels, self.label_dim = 8, 2, 3
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, noise_labels, class_labels):
        self.seen = (x.detach().clone(), noise_labels.detach().clone(), class_labels, x.dtype)
        out = torch.tanh(self.lin(x))
        self.out_dtype = out.dtype
        return out


def test_preconditioning_closed_forms():
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    sd = 0.5
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sd)
    torch.testing.assert_close(c_skip, sd ** 2 / (sigma ** 2 + sd ** 2))
    torch.testing.assert_close(c_out, sigma * sd / torch.sqrt(sigma ** 2 + sd ** 2))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma ** 2 + sd ** 2))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    # EDM's design: unit-variance input and an effective target of unit variance
    torch.testing.assert_close(c_in ** 2 * (sd ** 2 + sigma ** 2), torch.ones_like(sigma))
    torch.testing.assert_close(c_skip ** 2 * sigma ** 2 / c_out ** 2 + (1 - c_skip) ** 2 * sd ** 2 / c_out ** 2,
                               torch.ones_like(sigma))


def test_precond_wraps_network_as_spec5():
    torch.manual_seed(0)
    rec = _Recorder()
    pre = EDMPrecond(rec, sigma_data=0.5)
    x, sigma = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 7.0])
    labels = torch.eye(3)[:2]
    out = pre(x, sigma, labels)
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_in = 1 / torch.sqrt(s ** 2 + 0.25)
    x_in, noise, lab, _ = rec.seen
    torch.testing.assert_close(x_in.double(), c_in * x.double())
    torch.testing.assert_close(noise.double(), torch.log(sigma.double()) / 4)
    assert torch.equal(lab, labels)
    f = torch.tanh(rec.lin(x_in)).double()
    expected = 0.25 / (s ** 2 + 0.25) * x.double() + s * 0.5 / torch.sqrt(s ** 2 + 0.25) * f
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.float32


def test_precond_defaults_and_argument_checks():
    rec = _Recorder()
    pre = EDMPrecond(rec)
    assert (pre.img_resolution, pre.img_channels, pre.label_dim) == (8, 2, 3)
    pre(torch.randn(4, 2, 8, 8), 0.5)      # scalar sigma, labels default to the zero vector
    assert rec.seen[1].shape == (4,) and torch.equal(rec.seen[2], torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        pre(torch.randn(4, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="sigma"):
        pre(torch.randn(4, 2, 8, 8), torch.ones(3))
    with pytest.raises(ValueError, match="amp"):
        pre.amp = "int8"


def test_precond_bfloat16_runs_network_in_bf16_and_returns_float32():
    torch.manual_seed(0)
    rec = _Recorder()
    pre = EDMPrecond(rec, amp="bfloat16")
    x, sigma = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 2.0])
    out = pre(x, sigma, torch.eye(3)[:2])
    assert rec.out_dtype == torch.bfloat16 and out.dtype == torch.float32
    pre.amp = None
    ref = pre(x, sigma, torch.eye(3)[:2])
    assert rec.out_dtype == torch.float32
    # only F is rounded: |D_bf16 - D_fp32| <= c_out * (bf16 error of F), F in [-1, 1]
    c_out = (sigma * 0.5 / torch.sqrt(sigma ** 2 + 0.25)).reshape(-1, 1, 1, 1)
    assert ((out - ref).abs() <= c_out * 2 ** -6).all()


# ----------------------------------------------------------------------------- weight files

def _tiny(label_dim=0, seed=0):
    torch.manual_seed(seed)
    return randomize_(build_model(network_kwargs("tiny", 16, label_dim=label_dim)), seed).eval()


def _meta(model):
    return {"stage": "base", "network": network_kwargs("tiny", 16, label_dim=model.label_dim),
            "precond": model.config(), "relay": None, "step": 5, "kimg": 0.04, "resolution": 16,
            "label_dim": model.label_dim}


def test_load_model_from_file_run_dir_and_converted(tmp_path):
    model, ema = _tiny(2, seed=1), _tiny(2, seed=2)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000005.safetensors"
    save_weights(ckpt, tensors, _meta(model))
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.eye(2)
    for source in (ckpt, tmp_path / "run"):
        for which, ref in (("ema", ema), ("model", model)):
            loaded, meta = load_model(source, which=which)
            assert meta["step"] == 5 and meta["format"] == 1
            assert not loaded.training
            torch.testing.assert_close(loaded(x, sigma, labels), ref(x, sigma, labels), rtol=0, atol=0)
    converted = tmp_path / "release.safetensors"
    save_weights(converted, {k: v for k, v in tensors.items() if k.startswith("ema.")}, _meta(model))
    loaded, _ = load_model(converted)
    torch.testing.assert_close(loaded(x, sigma, labels), ema(x, sigma, labels), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no 'model' weights"):
        load_model(converted, which="model")
    with pytest.raises(ValueError, match="which"):
        load_model(converted, which="best")


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="latest"):
        load_model(tmp_path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a relaydiff weight file"):
        read_meta(tmp_path / "plain.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu():
    net = _tiny(3, seed=4)
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 3.0]), torch.eye(3)[:2]
    ref = net(x, sigma, labels)
    gpu = net.cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = gpu(x.cuda(), sigma.cuda(), labels.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    gpu.amp = "bfloat16"
    out16 = gpu(x.cuda(), sigma.cuda(), labels.cuda()).cpu()
    assert out16.dtype == torch.float32 and (out16 - ref).abs().max() < 0.1
