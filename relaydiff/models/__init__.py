"""relaydiff.models: the ADM and DDPM++/NCSN++ U-Nets, EDM's preconditioners, presets and checkpoint loading."""
from .checkpoint import load_model, read_meta, resolve_checkpoint, save_weights
from .convert import ConversionError, convert_checkpoint, convert_release, load_pretrained
from .precond import PRECONDITIONERS, EDMPrecond, Precond, VEPrecond, VPPrecond, iDDPMPrecond, preconditioning
from .presets import NETWORKS, PRESETS, Preset, build_model, count_parameters, get_preset, network_kwargs
from .safe_pickle import ForbiddenGlobal
from .songunet import SongUNet
from .unet import DhariwalUNet

__all__ = ["DhariwalUNet", "SongUNet", "NETWORKS", "Precond", "EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond",
           "PRECONDITIONERS", "preconditioning", "PRESETS", "Preset", "build_model",
           "count_parameters", "get_preset", "network_kwargs", "load_model", "read_meta",
           "resolve_checkpoint", "save_weights", "ConversionError", "ForbiddenGlobal", "convert_checkpoint",
           "convert_release", "load_pretrained"]
