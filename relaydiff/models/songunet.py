"""The DDPM++ and NCSN++ U-Nets of Song et al. 2021 in the form EDM implements them (``SongUNet``).

EDM's released CIFAR-10 and FFHQ/AFHQ models (``edm-*-vp``, ``baseline-*-vp``: DDPM++) and
its VE baseline (``baseline-cifar10-32x32-uncond-ve``: NCSN++) use this network. Parameter
names and shapes are those of EDM's ``training/networks.py`` so that their state dicts load
one to one (``strict=True``):

* ``map_noise`` (NCSN++: the buffer ``map_noise.freqs`` ``[noise_channels / 2]``),
  ``map_label.{weight,bias}``, ``map_augment.weight``, ``map_layer0``, ``map_layer1``;
* ``enc.<R>x<R>_conv``, ``enc.<R>x<R>_down``, ``enc.<R>x<R>_aux_down`` / ``_aux_skip`` (skip
  encoder), ``enc.<R>x<R>_aux_residual`` (residual encoder, NCSN++), ``enc.<R>x<R>_block<i>``;
* ``dec.<R>x<R>_in0``, ``_in1``, ``_up``, ``_block<i>``, ``_aux_up`` (skip decoder),
  ``_aux_norm``, ``_aux_conv`` (the output head at the top level).

DDPM++ is ``embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
resample_filter=(1, 1)``; NCSN++ is ``"fourier", 2, "residual", (1, 3, 3, 1)``. Shapes as
:class:`~relaydiff.models.DhariwalUNet`: ``x`` ``[B, in_channels, R, R]``, ``noise_labels``
``[B]`` (the preconditioner's ``c_noise``), ``class_labels`` ``[B, label_dim]`` or None,
``augment_labels`` ``[B, augment_dim]`` or None; output ``[B, out_channels, R, R]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, embedding_dtype, label_input

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi x f_i), sin(2 pi x f_i)]`` with the buffer ``freqs``
    ``[C/2]`` drawn from ``N(0, scale^2)`` (NCSN++): ``[B] -> [B, C]``, float64 for a float64
    ``x``, float32 otherwise."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = embedding_dtype(x)
        arg = x.to(dtype)[:, None] * (2 * math.pi * self.freqs).to(dtype)[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ with EDM's constructor (defaults: EDM's, i.e. DDPM++ at CIFAR-10 size).

    Mapping: ``emb = [sin, cos]`` of the noise embedding, ``+ map_label(sqrt(label_dim) c)``,
    ``+ map_augment(a)``, then ``silu(map_layer1(silu(map_layer0(emb))))``.
    Encoder: a 3x3 conv to ``model_channels`` at the top level, a down block per lower level
    (plus the auxiliary path of ``encoder_type``), then ``num_blocks`` blocks of
    ``model_channels * channel_mult[l]`` channels, attention at ``attn_resolutions``.
    Decoder: two middle blocks (``in0`` with attention) at the lowest level, an up block
    elsewhere, ``num_blocks + 1`` blocks on the concatenated skips (attention only in the last
    one of an attention level), and ``silu(norm) -> 3x3 conv`` output heads (at every level for
    ``decoder_type="skip"``, each sum upsampled into the next; the top level only otherwise).
    Blocks: one attention head, ``skip_scale = sqrt(1/2)``, GroupNorm eps 1e-6, projected
    resampling skips, additive (not scale-shift) conditioning."""

    def __init__(self,
                 img_resolution: int,                      # image resolution at input/output
                 in_channels: int,                         # colour channels at input
                 out_channels: int,                        # colour channels at output
                 label_dim: int = 0,                       # number of classes, 0 = unconditional
                 augment_dim: int = 0,                     # augmentation label dimensionality, 0 = none
                 model_channels: int = 128,                # base channel count
                 channel_mult: tuple[int, ...] = (1, 2, 2, 2),  # per-resolution channel multipliers
                 channel_mult_emb: int = 4,                # embedding width = model_channels * this
                 num_blocks: int = 4,                      # residual blocks per resolution
                 attn_resolutions: tuple[int, ...] = (16,),  # resolutions with self-attention
                 dropout: float = 0.10,                    # dropout of intermediate activations
                 label_dropout: float = 0.0,               # class-label dropout (CFG) inside the network
                 embedding_type: str = "positional",       # noise embedding: positional (DDPM++), fourier (NCSN++)
                 channel_mult_noise: int = 1,              # noise embedding width = model_channels * this
                 encoder_type: str = "standard",           # standard (DDPM++), skip, residual (NCSN++)
                 decoder_type: str = "standard",           # standard (DDPM++, NCSN++) or skip
                 resample_filter: tuple[int, ...] = (1, 1),  # (1, 1) for DDPM++, (1, 3, 3, 1) for NCSN++
                 ):
        super().__init__()
        for name, value, allowed in (("embedding_type", embedding_type, EMBEDDING_TYPES),
                                     ("encoder_type", encoder_type, ENCODER_TYPES),
                                     ("decoder_type", decoder_type, DECODER_TYPES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} must be divisible by "
                             f"2^(len(channel_mult) - 1) = {1 << (len(channel_mult) - 1)}")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim = label_dim, augment_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        resample_filter = tuple(resample_filter)
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

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
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3)
        self._init_weights()

    def _init_weights(self) -> None:
        """EDM's initialisation of this network: Xavier-uniform weights (times 1e-5 for the
        last convolution of each residual branch and the output heads, sqrt(0.2) for qkv),
        zero biases."""
        with torch.no_grad():
            for name, m in self.named_modules():
                if not isinstance(m, (Linear, Conv2d)) or m.weight is None:
                    continue
                gain = 1e-5 if name.endswith((".conv1", ".proj", "_aux_conv")) else \
                    math.sqrt(0.2) if name.endswith(".qkv") else 1.0
                receptive = m.weight[0, 0].numel() if m.weight.dim() == 4 else 1
                fan_in, fan_out = m.weight.shape[1] * receptive, m.weight.shape[0] * receptive
                bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
                m.weight.uniform_(-bound, bound)
                if m.bias is not None:
                    m.bias.zero_()

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)   # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = label_input(self, class_labels, x)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, m in self.enc.items():
            if name.endswith("_aux_down"):
                aux = m(aux)
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + m(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + m(aux)) / math.sqrt(2)
            else:
                x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
                skips.append(x)

        aux = head = None
        for name, m in self.dec.items():
            if name.endswith("_aux_up"):
                aux = m(aux)
            elif name.endswith("_aux_norm"):
                head = m(x)
            elif name.endswith("_aux_conv"):
                head = m(F.silu(head))
                aux = head if aux is None else head + aux
            else:
                if x.shape[1] != m.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
        return aux
