"""Fake (meta) kernels and autograd for the compiled ops, so that torch.compile traces
through them and ``torch.library.opcheck`` passes. Only imported when relaydiff._C loaded."""
from __future__ import annotations

import torch


def _image_fake(x: torch.Tensor) -> torch.Tensor:
    torch._check(x.dim() == 4, lambda: f"expected [B, C, H, W], got {x.dim()}-D")
    return x.new_empty(x.shape)


@torch.library.register_fake("relaydiff::patch_dct")
def _patch_dct_fake(x, patch_size):
    return _image_fake(x)


@torch.library.register_fake("relaydiff::patch_idct")
def _patch_idct_fake(u, patch_size):
    return _image_fake(u)


@torch.library.register_fake("relaydiff::patch_blur")
def _patch_blur_fake(x, tau, patch_size, min_scale):
    torch._check(tau.shape == (x.shape[0],), lambda: "tau must be [B]")
    return _image_fake(x)


@torch.library.register_fake("relaydiff::block_noise")
def _block_noise_fake(like, block_size, seed):
    return _image_fake(like)


@torch.library.register_fake("relaydiff::mixed_noise")
def _mixed_noise_fake(like, alpha, block_size, normalize, seed):
    return _image_fake(like)


@torch.library.register_fake("relaydiff::relay_corrupt")
def _relay_corrupt_fake(x0, sigma, tau, patch_size, alpha, block_size, min_scale, normalize, seed):
    torch._check(sigma.shape == (x0.shape[0],), lambda: "sigma must be [B]")
    torch._check(tau.shape == (x0.shape[0],), lambda: "tau must be [B]")
    return _image_fake(x0)


@torch.library.register_fake("relaydiff::relay_step")
def _relay_step_fake(x, denoised, x_prop, denoised_prop, sigma, sigma_next, tau, tau_next,
                     s_noise, patch_size, alpha, block_size, min_scale, normalize, seed):
    return _image_fake(x)


# ------------------------------------------------------------------ autograd
# The patch DCT is orthonormal, so the adjoint (= gradient) of each map is the other map.

def _setup_p(ctx, inputs, output):
    ctx.patch_size = inputs[1]


def _patch_dct_backward(ctx, grad):
    return torch.ops.relaydiff.patch_idct(grad.contiguous(), ctx.patch_size), None


def _patch_idct_backward(ctx, grad):
    return torch.ops.relaydiff.patch_dct(grad.contiguous(), ctx.patch_size), None


torch.library.register_autograd("relaydiff::patch_dct", _patch_dct_backward, setup_context=_setup_p)
torch.library.register_autograd("relaydiff::patch_idct", _patch_idct_backward, setup_context=_setup_p)


# Blur is a diagonal scaling in an orthonormal basis: self-adjoint.
def _blur_setup(ctx, inputs, output):
    x, tau, patch_size, min_scale = inputs
    ctx.save_for_backward(tau)
    ctx.patch_size, ctx.min_scale = patch_size, min_scale


def _no_grad_for(ctx, op: str, names: tuple[str, ...], idx: tuple[int, ...]) -> None:
    for name, i in zip(names, idx):
        if ctx.needs_input_grad[i]:
            raise RuntimeError(f"relaydiff.{op} is not differentiable with respect to {name}")


def _patch_blur_backward(ctx, grad):
    _no_grad_for(ctx, "patch_blur", ("tau",), (1,))
    (tau,) = ctx.saved_tensors
    gx = torch.ops.relaydiff.patch_blur(grad.contiguous(), tau, ctx.patch_size, ctx.min_scale)
    return gx, None, None, None


torch.library.register_autograd("relaydiff::patch_blur", _patch_blur_backward, setup_context=_blur_setup)


def _corrupt_setup(ctx, inputs, output):
    x0, sigma, tau, patch_size, alpha, block_size, min_scale, normalize, seed = inputs
    ctx.save_for_backward(tau)
    ctx.patch_size, ctx.min_scale = patch_size, min_scale


def _relay_corrupt_backward(ctx, grad):
    _no_grad_for(ctx, "relay_corrupt", ("sigma", "tau"), (1, 2))
    (tau,) = ctx.saved_tensors
    gx = torch.ops.relaydiff.patch_blur(grad.contiguous(), tau, ctx.patch_size, ctx.min_scale)
    return (gx,) + (None,) * 8


torch.library.register_autograd("relaydiff::relay_corrupt", _relay_corrupt_backward,
                                setup_context=_corrupt_setup)
