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

Arguments are the op schemas' (``csrc/ops.cpp``) without the seed. Like the compiled ops, a
direct ``torch.ops.relaydiff.*_drawn`` call checks its arguments before it draws a seed or
touches data, in its fake (meta) kernel too (:func:`check_args`, the checks of
``csrc/common/checks.h``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ext
from . import _validate as V
from . import reference as R

_TAGS = (torch.Tag.nondeterministic_seeded,)
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_args(x: Tensor, name: str, p=None, block=None, seed=None, units=(), alpha=None,
               per_sample=(), images=()) -> None:
    """The checks of csrc/common/checks.h that need no values, for the fake (meta) kernels of
    the ops and for the ``*_drawn`` ops here.

    The dispatcher picks a fake (meta) kernel whenever *any* argument is on the meta device,
    so a direct call with one meta tensor among real ones, or an invalid argument, lands
    there too: it must fail as the C++ glue does, not return uninitialised memory."""
    def check(ok, msg):
        torch._check(ok, lambda: msg)

    check(x.dim() == 4, f"{name} must be a 4-D tensor [B, C, H, W]; got {x.dim()}-D")
    check(x.dtype in _FLOATS, f"{name} must be float32, float64, float16 or bfloat16; got {x.dtype}")
    if p is not None:
        check(p in (2, 4, 8, 16), f"patch_size must be 2, 4, 8 or 16; got {p}")
        check(x.shape[2] % p == 0 and x.shape[3] % p == 0, f"{name}: H and W must be multiples of patch_size={p}")
    if block is not None:
        check(1 <= block <= 16, f"block_size must be in [1, 16]; got {block}")
        check(x.numel() == 0 or (block <= x.shape[2] and block <= x.shape[3]),
              f"block_size={block} is larger than the image")
    if seed is not None:
        check(seed >= 0, f"seed must be non-negative; got {seed}")
    if alpha is not None:
        check(alpha >= 0 and alpha != float("inf"), f"alpha must be finite and non-negative; got {alpha}")
    for unit, value, closed in units:
        check(0 <= value and (value <= 1 if closed else value < 1), f"{unit} must be in [0, 1]; got {value}")
    for n, t in per_sample:
        check(t.dim() == 1 and t.shape[0] == x.shape[0], f"{n} must have shape [B] = [{x.shape[0]}]")
        check(t.is_floating_point(), f"{n} must be a floating tensor; got {t.dtype}")
        check(t.device == x.device, f"{n} is on {t.device} but the images are on {x.device}")
    for n, t in images:
        if t is not None:
            check(t.shape == x.shape and t.dtype == x.dtype, f"{n} must have the shape and dtype of {name}")
            check(t.device == x.device, f"{n} is on {t.device} but {name} is on {x.device}")


def fake_like(x: Tensor, name: str, *args, **kwargs) -> Tensor:
    """The output like ``x`` (contiguous) after :func:`check_args`: a fake (meta) kernel."""
    check_args(x, name, *args, **kwargs)
    return x.new_empty(x.shape)


def _check_block_noise(like, block_size):
    check_args(like, "like", block=block_size)


def _check_mixed_noise(like, alpha, block_size, normalize):
    check_args(like, "like", block=block_size, alpha=alpha)


def _check_corrupt(x0, sigma, tau, patch_size, alpha, block_size, min_scale, normalize):
    check_args(x0, "x0", patch_size, block_size, None, [("min_scale", min_scale, False)], alpha,
               per_sample=[("sigma", sigma), ("tau", tau)])


def _check_step(x, denoised, x_prop, denoised_prop, sigma, sigma_next, tau, tau_next, s_noise, patch_size,
                alpha, block_size, min_scale, normalize):
    torch._check((x_prop is None) == (denoised_prop is None),
                 lambda: "x_prop and denoised_prop must be given together or both be None")
    check_args(x, "x", patch_size, block_size, None, [("s_noise", s_noise, True), ("min_scale", min_scale, False)],
               alpha, per_sample=[("sigma", sigma), ("sigma_next", sigma_next), ("tau", tau), ("tau_next", tau_next)],
               images=[("denoised", denoised), ("x_prop", x_prop), ("denoised_prop", denoised_prop)])


_CHECKS = {"block_noise": _check_block_noise, "mixed_noise": _check_mixed_noise,
           "relay_corrupt": _check_corrupt, "relay_step": _check_step}


def _run(name: str, like: Tensor, *args):
    _CHECKS[name](like, *args)  # before a seed is drawn: a refused call leaves the generator alone
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


def _fake_for(name: str):
    def fake(like, *args):
        _CHECKS[name](like, *args)
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return fake


for _name, _op in (("block_noise", block_noise_drawn), ("mixed_noise", mixed_noise_drawn),
                   ("relay_corrupt", relay_corrupt_drawn), ("relay_step", relay_step_drawn)):
    _op.register_fake(_fake_for(_name))


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
