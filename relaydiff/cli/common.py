"""Helpers shared by the CLI subcommands."""
from __future__ import annotations

import os


class CLIError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2, nothing written."""


def existing_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise CLIError(f"{what} {path!r} is not a directory")
    return path


def existing_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise CLIError(f"{what} {path!r} does not exist")
    return path


def pick_device(name: str | None):
    import torch
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return dev
