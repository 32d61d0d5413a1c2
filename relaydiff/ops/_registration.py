"""Fake (meta) kernels and autograd for the compiled ops, so that torch.compile traces
through them and ``torch.library.opcheck`` passes. Only imported when relaydiff._C loaded."""
from __future__ import annotations

import torch

from ._drawn import corrupt_backward, corrupt_setup, no_grad_for, step_backward, step_setup
from ._drawn import fake_like as _fake


@torch.library.register_fake("relaydiff::patch_dct")
def _patch_dct_fake(x, patch_size):
    return _fake(x, "x", patch_size)


@torch.library.register_fake("relaydiff::patch_idct")
def _patch_idct_fake(u, patch_size):
    return _fake(u, "u", patch_size)


@torch.library.register_fake("relaydiff::patch_blur")
def _patch_blur_fake(x, tau, patch_size, min_scale):
    return _fake(x, "x", patch_size, units=[("min_scale", min_scale, False)], per_sample=[("tau", tau)])


@torch.library.register_fake("relaydiff::block_noise")
def _block_noise_fake(like, block_size, seed):
    return _fake(like, "like", block=block_size, seed=seed)


@torch.library.register_fake("relaydiff::mixed_noise")
def _mixed_noise_fake(like, alpha, block_size, normalize, seed):
    return _fake(like, "like", block=block_size, seed=seed, alpha=alpha)


@torch.library.register_fake("relaydiff::relay_corrupt")
def _relay_corrupt_fake(x0, sigma, tau, patch_size, alpha, block_size, min_scale, normalize, seed):
    return _fake(x0, "x0", patch_size, block_size, seed, [("min_scale", min_scale, False)], alpha,
                 per_sample=[("sigma", sigma), ("tau", tau)])


@torch.library.register_fake("relaydiff::relay_step")
def _relay_step_fake(x, denoised, x_prop, denoised_prop, sigma, sigma_next, tau, tau_next,
                     s_noise, patch_size, alpha, block_size, min_scale, normalize, seed):
    torch._check((x_prop is None) == (denoised_prop is None),
                 lambda: "x_prop and denoised_prop must be given together or both be None")
    return _fake(x, "x", patch_size, block_size, seed, [("s_noise", s_noise, True), ("min_scale", min_scale, False)],
                 alpha, per_sample=[("sigma", sigma), ("sigma_next", sigma_next), ("tau", tau), ("tau_next", tau_next)],
                 images=[("denoised", denoised), ("x_prop", x_prop), ("denoised_prop", denoised_prop)])


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


def _patch_blur_backward(ctx, grad):
    no_grad_for(ctx, "patch_blur", ("tau",), (1,))
    (tau,) = ctx.saved_tensors
    gx = torch.ops.relaydiff.patch_blur(grad.contiguous(), tau, ctx.patch_size, ctx.min_scale)
    return gx, None, None, None


torch.library.register_autograd("relaydiff::patch_blur", _patch_blur_backward, setup_context=_blur_setup)


torch.library.register_autograd("relaydiff::relay_corrupt", corrupt_backward, setup_context=corrupt_setup)


# relay_step is linear in its four images: reference.relay_step_vjp gives their gradients;
# sigma, tau and their next values get none (a clear error)
torch.library.register_autograd("relaydiff::relay_step", step_backward, setup_context=step_setup)
