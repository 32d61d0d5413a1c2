"""relaydiff: Relay Diffusion (Teng et al., ICLR 2024) with fused C++/CUDA kernels."""
from . import ops
from .config import RelayConfig

__version__ = "0.1.0"

__all__ = ["ops", "RelayConfig", "__version__"]
