"""Non-leaking geometric augmentation with conditioning labels (EDM's approach, the paper's
CelebA-HQ runs: augment probability 0.2, Table 4).

Each training image is, with probability ``p`` per transform and independently, flipped in x,
flipped in y, scaled, rotated, stretched anisotropically and translated. The network sees a
9-dimensional label describing what was done (``augment_dim=9`` in the U-Net), so it learns
the augmented distribution *as such* and, given the all-zero label (no augmentation: what
the samplers pass), generates un-augmented images. The relay loss blurs and noises the
augmented image, whose clean version is the target.

Labels, all zero for an untouched image:

==== ==========================================================================
0    1 if flipped left-right
1    1 if flipped upside-down
2    log2 of the isotropic scale s (s > 1 enlarges the content)
3, 4 cos(theta) - 1, sin(theta) of the rotation by theta (counter-clockwise on screen)
5, 6 log2(a) cos(2 phi), log2(a) sin(2 phi): stretch by a along the direction phi and by
     1/a across it
7, 8 translation (tx, ty) as fractions of the width and height (right, down)
==== ==========================================================================

Distributions (EDM's defaults): ``log2 s ~ N(0, 0.2^2)``, ``theta ~ U(-pi, pi)``,
``log2 a ~ N(0, 0.2^2)`` with ``phi ~ U(-pi, pi)``, ``tx, ty ~ N(0, 0.125^2)``. Flips are
exact; the other transforms resample once (bicubic, reflected at the borders), only the
images that drew one. The label layout and the resampling filter are relaydiff's own, not
EDM's: a network trained with EDM's ``AugmentPipe`` gets different labels from this one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENT_DIM = 9


class GeometricAugment:
    """``augment(images) -> (augmented, labels [B, 9])`` for ``images`` ``[B, C, H, W]`` (float).

    ``p`` is the probability of each transform (0 turns augmentation off: the images come
    back unchanged with zero labels). ``generator`` (optional) makes the draws reproducible
    independently of torch's global generator; by default the global one is used, so a
    saved RNG state resumes a run exactly.
    """

    def __init__(self, p: float, *, scale_std: float = 0.2, rotate: bool = True, aniso_std: float = 0.2,
                 translate_std: float = 0.125, generator: torch.Generator | None = None):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"augment probability p must be in [0, 1]; got {p!r}")
        for name, v in (("scale_std", scale_std), ("aniso_std", aniso_std), ("translate_std", translate_std)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
        self.p = float(p)
        self.scale_std, self.aniso_std, self.translate_std = float(scale_std), float(aniso_std), float(translate_std)
        self.rotate = bool(rotate)
        self.generator = generator

    def _rand(self, *shape, device, normal=False):
        fn = torch.randn if normal else torch.rand
        return fn(*shape, generator=self.generator, device=self.generator.device if self.generator else device,
                  dtype=torch.float64).to(device)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a floating [B, C, H, W] tensor; got "
                             f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
        b, _, h, w = images.shape
        dev = images.device
        labels = torch.zeros(b, AUGMENT_DIM, dtype=torch.float64, device=dev)
        if self.p == 0.0 or b == 0:
            return images, labels.to(images.dtype)
        # one draw per transform per image, in a fixed order (reproducible)
        hit = self._rand(b, 6, device=dev) < self.p                  # xflip, yflip, scale, rot, aniso, trans
        u = self._rand(b, 2, device=dev)                             # rotation angle, aniso direction
        z = self._rand(b, 4, device=dev, normal=True)                # log2 s, log2 a, tx, ty
        x = images
        xf, yf = hit[:, 0], hit[:, 1]
        if xf.any():
            x = torch.where(xf[:, None, None, None], x.flip(3), x)
        if yf.any():
            x = torch.where(yf[:, None, None, None], x.flip(2), x)
        labels[:, 0], labels[:, 1] = xf.double(), yf.double()

        log_s = torch.where(hit[:, 2], z[:, 0] * self.scale_std, 0.0)
        theta = torch.where(hit[:, 3] & self.rotate, (u[:, 0] * 2 - 1) * math.pi, 0.0)
        log_a = torch.where(hit[:, 4], z[:, 1] * self.aniso_std, 0.0)
        phi = torch.where(hit[:, 4], (u[:, 1] * 2 - 1) * math.pi, 0.0)
        tx = torch.where(hit[:, 5], z[:, 2] * self.translate_std, 0.0)
        ty = torch.where(hit[:, 5], z[:, 3] * self.translate_std, 0.0)
        labels[:, 2] = log_s
        labels[:, 3], labels[:, 4] = torch.cos(theta) - 1, torch.sin(theta)
        labels[:, 5], labels[:, 6] = log_a * torch.cos(2 * phi), log_a * torch.sin(2 * phi)
        labels[:, 7], labels[:, 8] = tx, ty

        moved = hit[:, 2] | (hit[:, 3] & self.rotate) | hit[:, 4] | hit[:, 5]
        if moved.any():
            idx = moved.nonzero().squeeze(1)
            grid = self._grid(log_s[idx], theta[idx], log_a[idx], phi[idx], tx[idx], ty[idx], h, w, x.dtype)
            warped = F.grid_sample(x[idx], grid, mode="bicubic", padding_mode="reflection", align_corners=False)
            x = x.index_copy(0, idx, warped)
        return x, labels.to(images.dtype)

    @staticmethod
    def _grid(log_s, theta, log_a, phi, tx, ty, h, w, dtype) -> torch.Tensor:
        """Sampling grid of the forward map ``q = T R(theta) A(a, phi) S(s) p`` on centred pixel
        coordinates (x right, y down): output pixel ``q`` reads input pixel ``p = F^-1(q)``."""
        n = log_s.shape[0]
        s = torch.exp2(log_s)
        a = torch.exp2(log_a)
        c, sn = torch.cos(theta), torch.sin(theta)
        # R rotates counter-clockwise on screen: with y pointing down that is [[c, s], [-s, c]]
        rot = torch.stack([torch.stack([c, sn], -1), torch.stack([-sn, c], -1)], -2)
        cp, sp = torch.cos(phi), torch.sin(phi)
        frame = torch.stack([torch.stack([cp, -sp], -1), torch.stack([sp, cp], -1)], -2)
        stretch = torch.diag_embed(torch.stack([a, 1 / a], -1))
        aniso = frame @ stretch @ frame.transpose(-1, -2)
        lin = rot @ aniso @ (s[:, None, None] * torch.eye(2, dtype=s.dtype, device=s.device))
        inv = torch.linalg.inv(lin)
        shift = torch.stack([tx * w, ty * h], -1)                    # pixels
        # normalised grid coordinates u (align_corners=False) <-> centred pixels: p = D u
        d = torch.tensor([w / 2, h / 2], dtype=s.dtype, device=s.device)
        theta_mat = torch.empty(n, 2, 3, dtype=s.dtype, device=s.device)
        theta_mat[:, :, :2] = inv * d[None, None, :] / d[None, :, None]        # D^-1 inv D
        theta_mat[:, :, 2] = -(inv @ shift[:, :, None]).squeeze(-1) / d[None, :]  # D^-1 (-inv t)
        return F.affine_grid(theta_mat.to(dtype), [n, 1, h, w], align_corners=False)
