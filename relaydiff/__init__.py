"""relaydiff: Relay Diffusion (Teng et al., ICLR 2024) with fused C++/CUDA kernels."""
from . import ops
from .config import NoiseConfig, RelayConfig

__version__ = "0.1.0"

__all__ = ["ops", "NoiseConfig", "RelayConfig", "__version__"]
