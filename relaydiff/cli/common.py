"""Helpers shared by the CLI subcommands."""
from __future__ import annotations

import os


class CLIError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2, nothing written."""


def existing_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise CLIError(f"{what} {path!r} is not a directory")
    return path


def new_folder(path: str, what: str) -> str:
    """An output folder that does not exist yet or is empty: a second run never mixes with a first."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{what} {path!r} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        raise CLIError(f"{what} {path!r} already holds files; choose a new or empty folder")
    return path


def existing_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise CLIError(f"{what} {path!r} does not exist")
    return path


def check_device(name: str | None) -> None:
    """``--device``: auto, cpu, cuda or cuda:N (CUDA only where it is available)."""
    import torch
    if name in (None, "auto"):
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")


def pick_device(name: str | None):
    import torch
    check_device(name)
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def one_line(e: BaseException) -> str:
    """An exception's message on one line. One re-raised from a DataLoader worker carries the
    worker's traceback in its message; only its last line, the original message, is kept."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and " " not in head else last   # "pkg.ImageError: msg" -> "msg"
    return " ".join(text.split()) or type(e).__name__


def add_image_limit(p) -> None:
    """``--max-image-pixels`` for the commands that read image files."""
    from relaydiff.images import BYTES_PER_PIXEL, DEFAULT_MAX_IMAGE_PIXELS as MAX_IMAGE_PIXELS
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                   help=f"refuse images of more than N pixels, from their header, and zip members that "
                        f"inflate to more than {BYTES_PER_PIXEL} N bytes (default {MAX_IMAGE_PIXELS} = 8192^2)")


def apply_image_limit(args) -> None:
    from relaydiff.images import set_max_image_pixels
    if args.max_image_pixels < 1:
        raise CLIError(f"--max-image-pixels must be a positive integer; got {args.max_image_pixels}")
    set_max_image_pixels(args.max_image_pixels)
