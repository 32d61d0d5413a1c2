"""One launch each of relay_corrupt, relay_step (Euler) and patch_dct at [64, 3, 256, 256]
float32, for Nsight Compute (bench/gpu_check.sh runs it under ``ncu -k regex:tile_kernel``):
the profile says whether the noise ops are bound by issue, latency, barriers or a pipe.

    ncu --clock-control none -k regex:tile_kernel --section SpeedOfLight python bench/ncu_ops.py
"""
import torch

import relaydiff.ops  # noqa: F401  (loads the ops)

K = torch.ops.relaydiff
x = torch.randn(64, 3, 256, 256, device="cuda")
d = torch.randn_like(x)
v = torch.linspace(0.5, 2.0, 64, dtype=torch.float64, device="cuda")
K.relay_corrupt(x, v, v, 4, 0.15, 4, 1e-3, True, 1)
K.relay_step(x, d, None, None, v, 0.5 * v, v, 0.5 * v, 0.2, 4, 0.15, 4, 1e-3, True, 2)
K.patch_dct(x, 4)
torch.cuda.synchronize()
print("profiled: relay_corrupt, relay_step, patch_dct")
