"""relaydiff.models: the ADM U-Net, EDM preconditioning, presets and checkpoint loading."""
from .checkpoint import load_model, read_meta, resolve_checkpoint, save_weights
from .convert import ConversionError, convert_checkpoint, convert_release, load_pretrained
from .precond import EDMPrecond, preconditioning
from .presets import PRESETS, Preset, build_model, count_parameters, get_preset, network_kwargs
from .safe_pickle import ForbiddenGlobal
from .unet import DhariwalUNet

__all__ = ["DhariwalUNet", "EDMPrecond", "preconditioning", "PRESETS", "Preset", "build_model",
           "count_parameters", "get_preset", "network_kwargs", "load_model", "read_meta",
           "resolve_checkpoint", "save_weights", "ConversionError", "ForbiddenGlobal", "convert_checkpoint",
           "convert_release", "load_pretrained"]
