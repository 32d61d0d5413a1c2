"""The ADM U-Net (Dhariwal & Nichol 2021) in the form EDM implements it (``DhariwalUNet``), SPEC 8.

Parameter names, shapes and the qkv channel layout are those of EDM's
``training/networks.py`` so that EDM and RDM state dicts load one to one (``strict=True``):

* ``map_noise`` (no parameters), ``map_augment.weight``, ``map_layer0.{weight,bias}``,
  ``map_layer1.{weight,bias}``, ``map_label.weight``;
* ``enc.<R>x<R>_conv``, ``enc.<R>x<R>_down``, ``enc.<R>x<R>_block<i>``; ``dec.<R>x<R>_in0``,
  ``dec.<R>x<R>_in1``, ``dec.<R>x<R>_up``, ``dec.<R>x<R>_block<i>``; ``out_norm``, ``out_conv``;
* inside a block: ``norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj``; resampling
  convolutions carry the buffer ``resample_filter`` ``[1, 1, 2, 2]``.

The building blocks (``Linear``, ``Conv2d``, ``GroupNorm``, ``PositionalEmbedding``, ``UNetBlock``)
are EDM's union of ADM, DDPM++ and NCSN++ and also make up :class:`~relaydiff.models.SongUNet`.
Everything runs in float64 when the parameters and the input are float64.

Shapes: ``x`` ``[B, in_channels, R, R]``, ``noise_labels`` ``[B]`` (EDM: ``ln(sigma) / 4``),
``class_labels`` ``[B, label_dim]`` or None, ``augment_labels`` ``[B, augment_dim]`` or None;
output ``[B, out_channels, R, R]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_BOUND = "uniform"   # U(-1/sqrt(fan_in), 1/sqrt(fan_in)): EDM's kaiming_uniform * sqrt(1/3)
_ZERO = "zero"


def _init_(tensor: torch.Tensor, mode: str, fan_in: int) -> None:
    with torch.no_grad():
        if mode == _ZERO:
            tensor.zero_()
        else:
            bound = 1.0 / math.sqrt(fan_in)
            tensor.uniform_(-bound, bound)


class Linear(nn.Module):
    """``y = x W^T + b``; weight ``[out, in]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: str = _BOUND):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _init_(self.weight, init, in_features)
        if self.bias is not None:
            _init_(self.bias, init, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """Optional 2x resampling (``up`` / ``down``) then a ``kernel x kernel`` convolution with
    'same' padding; ``kernel = 0`` resamples only.

    Resampling is EDM's: with ``f = outer(r, r) / sum(r)^2`` for ``resample_filter = r``
    (the buffer ``resample_filter`` ``[1, 1, k, k]``), ``down`` is the depthwise convolution with
    ``f`` at stride 2 and ``up`` the depthwise transposed convolution with ``4 f`` at stride 2,
    both padded by ``(k - 1) // 2``. For ``r = [1, 1]`` (ADM, DDPM++) these are exactly 2x2
    average pooling and nearest upsampling, which is what runs then; ``[1, 3, 3, 1]`` is NCSN++'s.
    ``fused_resample`` with ``down`` convolves first, at the high resolution (padding
    ``kernel // 2 + (k - 1) // 2``), and filters-and-subsamples after: EDM's NCSN++ encoder."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: tuple[int, ...] = (1, 1),
                 fused_resample: bool = False, init: str = _BOUND):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        if fused_resample and up and kernel:
            raise ValueError("Conv2d: fused_resample is implemented for down only")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fan_in = in_channels * kernel * kernel
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.empty(out_channels)) if kernel and bias else None
        if self.weight is not None:
            _init_(self.weight, init, fan_in)
        if self.bias is not None:
            _init_(self.bias, init, fan_in)
        r = torch.as_tensor(resample_filter, dtype=torch.float32)
        # from the tuple, not the tensor: the model must also build on the meta device (shapes only)
        self._box = len(resample_filter) == 2 and resample_filter[0] == resample_filter[1]
        self.register_buffer("resample_filter", torch.outer(r, r)[None, None] / r.sum().square()
                             if up or down else None)

    def _depthwise(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        f = self.resample_filter.to(x.dtype)
        c = x.shape[1]
        if self.up:
            if self._box:
                return F.interpolate(x, scale_factor=2, mode="nearest")
            return F.conv_transpose2d(x, f.mul(4).tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)
        if self._box:
            return F.avg_pool2d(x, 2)
        return F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_pad = self.weight.shape[-1] // 2 if self.weight is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0
        if self.fused_resample and self.down and self.weight is not None:
            x = self._depthwise(F.conv2d(x, self.weight, padding=w_pad + f_pad), 0)
            return x if self.bias is None else x + self.bias.reshape(1, -1, 1, 1)
        if self.up or self.down:
            x = self._depthwise(x, f_pad)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=w_pad)
        return x


class GroupNorm(nn.GroupNorm):
    """GroupNorm with ``min(32, C // 4)`` groups, eps 1e-5."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__(max(1, min(num_groups, num_channels // min_channels_per_group)), num_channels, eps=eps)


def embedding_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for a float64 input, float32 otherwise (half-precision noise labels are widened:
    the sinusoids of ``ln(sigma) / 4`` need float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding ``[cos(x f_i), sin(x f_i)]``, ``f_i = (1/max_positions)^(i / d)``,
    ``i = 0..C/2-1``, ``d = C/2`` (``C/2 - 1`` with ``endpoint``, DDPM++): ``[B] -> [B, C]``,
    float64 for a float64 ``x``, float32 otherwise."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        dtype = embedding_dtype(x)
        exponent = torch.arange(half, dtype=dtype, device=x.device) / (half - (1 if self.endpoint else 0))
        arg = x.to(dtype)[:, None] * ((1.0 / self.max_positions) ** exponent)[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


def label_input(net: nn.Module, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``class_labels`` ``[B, net.label_dim]`` with, in training, each row zeroed with
    probability ``net.label_dropout`` (classifier-free guidance dropout inside the network)."""
    if class_labels is None:
        raise ValueError(f"class_labels [B, {net.label_dim}] are required (label_dim={net.label_dim})")
    if net.training and net.label_dropout:
        keep = torch.rand(x.shape[0], 1, device=x.device) >= net.label_dropout
        return class_labels * keep.to(class_labels.dtype)
    return class_labels


class UNetBlock(nn.Module):
    """EDM's residual block (the union of ADM, DDPM++ and NCSN++): optional 2x resampling and
    multi-head self-attention (``num_heads``, or ``out_channels // channels_per_head`` heads).

    ``h = conv0(silu(norm0(x)))``; then with ``adaptive_scale`` (ADM) ``h = silu(shift + norm1(h)
    * (1 + scale))``, ``(scale, shift) = affine(emb)``, else (DDPM++/NCSN++) ``h = silu(norm1(h +
    affine(emb)))``; ``h = skip_scale * (conv1(dropout(h)) + skip(x))``; then, with attention,
    ``h = skip_scale * (proj(attn(norm2(h))) + h)``. ``skip`` resamples, and projects when the
    width changes or ``resample_proj``."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: tuple[int, ...] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (num_heads if num_heads is not None else out_channels // channels_per_head) if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, init=_ZERO)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, init=_ZERO)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.skip_scale == 1 else x * self.skip_scale

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = self._scaled(x + (self.skip(orig) if self.skip is not None else orig))
        if self.num_heads:
            b, c, h, w = x.shape
            # EDM's layout: the 3C qkv channels split as (head, channel-in-head, q|k|v)
            q, k, v = self.qkv(self.norm2(x)).reshape(b, self.num_heads, c // self.num_heads, 3, h * w).unbind(3)
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            x = self._scaled(self.proj(a.transpose(-1, -2).reshape(b, c, h, w)) + x)
        return x


class DhariwalUNet(nn.Module):
    """The ADM U-Net with EDM's constructor (SPEC 8).

    Encoder: at level ``l`` (resolution ``R >> l``) a 2x down block (``l > 0``; a 3x3 conv at
    ``l = 0``) then ``num_blocks`` blocks of ``model_channels * channel_mult[l]`` channels.
    Decoder: at the lowest resolution two middle blocks (``in0`` always with attention, ``in1``),
    elsewhere an up block, then ``num_blocks + 1`` blocks fed with the concatenated skips.
    Attention at every resolution in ``attn_resolutions`` (64 channels per head).

    ``gradient_checkpointing = True`` (an attribute, not a constructor argument, so that it stays
    out of saved configs) recomputes every block's activations in the backward pass."""

    def __init__(self,
                 img_resolution: int,                      # image resolution at input/output
                 in_channels: int,                         # colour channels at input
                 out_channels: int,                        # colour channels at output
                 label_dim: int = 0,                       # number of classes, 0 = unconditional
                 augment_dim: int = 0,                     # augmentation label dimensionality, 0 = none
                 model_channels: int = 192,                # base channel count
                 channel_mult: tuple[int, ...] = (1, 2, 3, 4),  # per-resolution channel multipliers
                 channel_mult_emb: int = 4,                # embedding width = model_channels * this
                 num_blocks: int = 3,                      # residual blocks per resolution
                 attn_resolutions: tuple[int, ...] = (32, 16, 8),  # resolutions with self-attention
                 dropout: float = 0.10,                    # dropout of intermediate activations
                 label_dropout: float = 0.0,               # class-label dropout (CFG) inside the network
                 ):
        super().__init__()
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} must be divisible by "
                             f"2^(len(channel_mult) - 1) = {1 << (len(channel_mult) - 1)}")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim = label_dim, augment_dim
        self.label_dropout = label_dropout
        self.gradient_checkpointing = False
        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, init=_ZERO) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(label_dim, emb_channels, bias=False)
            with torch.no_grad():   # EDM: kaiming_normal * sqrt(label_dim) = N(0, 1)
                self.map_label.weight.normal_()

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, init=_ZERO)

    def _block(self, block: UNetBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(label_input(self, class_labels, x))
        emb = F.silu(emb)

        skips = []
        for m in self.enc.values():
            x = self._block(m, x, emb) if isinstance(m, UNetBlock) else m(x)
            skips.append(x)
        for m in self.dec.values():
            if x.shape[1] != m.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._block(m, x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
