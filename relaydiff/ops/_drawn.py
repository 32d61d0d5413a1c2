"""The noise ops with ``seed=None`` under ``torch.compile``.

Eagerly, ``seed=None`` draws a seed from torch's global CPU generator
(``relaydiff.ops._validate.check_seed``) and passes it to the op as an integer. A traced
program cannot turn a drawn tensor into a Python integer without breaking the graph, and a
random op inside the graph would draw from the compiler's generator, not torch's. So while
``torch.compile`` traces, the public ops call these custom ops instead: each draws its seed
when it *runs*, from the same generator and in the same order as eager code, and then runs the
kernel (or the reference twin). The compiled graph holds them as opaque calls, tagged
``nondeterministic_seeded`` so that no pass merges two calls or moves one. Under the same
``torch.manual_seed`` compiled and eager results are therefore identical.

Arguments are the op schemas' (``csrc/ops.cpp``) without the seed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ext
from . import _validate as V
from . import reference as R

_TAGS = (torch.Tag.nondeterministic_seeded,)


def _run(name: str, like: Tensor, *args):
    seed = V.check_seed(None)   # at run time: torch's global generator, as eager code draws it
    if _ext.has_kernel(like.device.type):
        return getattr(torch.ops.relaydiff, name)(like, *args, seed)
    return getattr(R, f"{name}_impl")(like, *args, seed)


def no_grad_for(ctx, op: str, names: tuple[str, ...], idx: tuple[int, ...]) -> None:
    for name, i in zip(names, idx):
        if ctx.needs_input_grad[i]:
            raise RuntimeError(f"relaydiff.{op} is not differentiable with respect to {name}")


@torch.library.custom_op("relaydiff::block_noise_drawn", mutates_args=(), tags=_TAGS)
def block_noise_drawn(like: Tensor, block_size: int) -> Tensor:
    return _run("block_noise", like, block_size)


@torch.library.custom_op("relaydiff::mixed_noise_drawn", mutates_args=(), tags=_TAGS)
def mixed_noise_drawn(like: Tensor, alpha: float, block_size: int, normalize: bool) -> Tensor:
    return _run("mixed_noise", like, alpha, block_size, normalize)


@torch.library.custom_op("relaydiff::relay_corrupt_drawn", mutates_args=(), tags=_TAGS)
def relay_corrupt_drawn(x0: Tensor, sigma: Tensor, tau: Tensor, patch_size: int, alpha: float, block_size: int,
                        min_scale: float, normalize: bool) -> Tensor:
    return _run("relay_corrupt", x0, sigma, tau, patch_size, alpha, block_size, min_scale, normalize)


@torch.library.custom_op("relaydiff::relay_step_drawn", mutates_args=(), tags=_TAGS)
def relay_step_drawn(x: Tensor, denoised: Tensor, x_prop: Tensor | None, denoised_prop: Tensor | None,
                     sigma: Tensor, sigma_next: Tensor, tau: Tensor, tau_next: Tensor, s_noise: float,
                     patch_size: int, alpha: float, block_size: int, min_scale: float, normalize: bool) -> Tensor:
    return _run("relay_step", x, denoised, x_prop, denoised_prop, sigma, sigma_next, tau, tau_next, s_noise,
                patch_size, alpha, block_size, min_scale, normalize)


for _op in (block_noise_drawn, mixed_noise_drawn, relay_corrupt_drawn, relay_step_drawn):
    _op.register_fake(lambda like, *args: torch.empty_like(like, memory_format=torch.contiguous_format))


def corrupt_setup(ctx, inputs, output):
    """relay_corrupt's autograd context, also for ``torch.ops.relaydiff.relay_corrupt`` (the
    seed at the end)."""
    ctx.save_for_backward(inputs[2])   # tau
    ctx.patch_size, ctx.min_scale, ctx.n_inputs = inputs[3], inputs[6], len(inputs)


def corrupt_backward(ctx, grad):
    # x_t = Blur_tau(x0) + sigma n: the blur is self-adjoint, the noise independent of x0
    no_grad_for(ctx, "relay_corrupt", ("sigma", "tau"), (1, 2))
    (tau,) = ctx.saved_tensors
    grad = grad.contiguous()
    blur = torch.ops.relaydiff.patch_blur if _ext.has_kernel(grad.device.type) else R.patch_blur_impl
    return (blur(grad, tau, ctx.patch_size, ctx.min_scale),) + (None,) * (ctx.n_inputs - 1)


def step_setup(ctx, inputs, output):
    """relay_step's autograd context, also for ``torch.ops.relaydiff.relay_step`` (one more
    argument, the seed, at the end; the others at the same places)."""
    ctx.save_for_backward(*inputs[4:8])   # sigma, sigma_next, tau, tau_next
    ctx.s_noise, ctx.patch_size, ctx.min_scale = inputs[8], inputs[9], inputs[12]
    ctx.heun, ctx.n_inputs = inputs[2] is not None, len(inputs)


def step_backward(ctx, grad):
    no_grad_for(ctx, "relay_step", ("sigma", "sigma_next", "tau", "tau_next"), (4, 5, 6, 7))
    grads = R.relay_step_vjp(grad, *ctx.saved_tensors, ctx.s_noise, ctx.patch_size, ctx.min_scale, ctx.heun)
    return grads + (None,) * (ctx.n_inputs - len(grads))


relay_corrupt_drawn.register_autograd(corrupt_backward, setup_context=corrupt_setup)
relay_step_drawn.register_autograd(step_backward, setup_context=step_setup)
