"""Read EDM ``.pkl`` and RDM ``.pt`` files without running code from them (docs/pretrained.md).

A plain ``pickle.load`` imports and calls whatever a file names, and an EDM network pickle
even ``exec``s the network's source text stored inside it. Here every global a pickle asks
for is looked up in :data:`ALLOWED_GLOBALS`, a short list of harmless stand-ins that only
*record* what the file describes; any other global raises :class:`ForbiddenGlobal` naming
it before anything is called.

* ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` -> :class:`PersistentRecord`
  (class name, the object's ``__dict__`` with ``_init_args``/``_init_kwargs``/``_parameters``/
  ``_buffers``/``_modules``; ``meta["module_src"]`` stays text and is never executed);
* ``torch.nn.modules.container.ModuleDict`` (built by NEWOBJ or ``copyreg._reconstructor``)
  -> :class:`ObjectRecord`; ``dnnlib.util.EasyDict`` -> a plain dict subclass;
* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` -> :class:`TensorRef`;
  storages -> :class:`StorageRef`, read lazily and always onto the CPU, whether they come
  from ``torch.storage._load_from_bytes`` (a legacy ``torch.save`` blob, parsed here with the
  same allow-list) or from a torch zip file's ``data/<key>`` record (saved from any device);
* numpy scalars -> Python numbers; ``collections.OrderedDict`` and ``set`` as themselves, and
  ``_codecs.encode`` (how protocol-2 pickles spell ``bytes``) as a latin-1 encoder;
* in a TorchScript archive (``torch.jit.save``; :class:`TorchScriptUnpickler`) every scripted
  class ``__torch__.*`` -> an :class:`ObjectRecord` of its attributes; its code is never run.

Because storages are read only when a :class:`TensorRef` is loaded, the optimizer state and
the raw training network of an RDM ``.pt`` are parsed as records but their data is never read.
"""
from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Iterator

import torch

from relaydiff.zipsizes import DeclaredSizeError, checked_member

# torch.serialization's legacy (non-zip) header: magic number, then protocol version
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_LEGACY_HEAD = pickle.dumps(LEGACY_MAGIC, protocol=2)
_ZIP_HEAD = b"PK\x03\x04"
# A torch file's pickle describes its tensors, whose data are other members: an EDM/RDM
# release's or an Inception network's data.pkl is tens of KB, a few MB at most with a big
# network's optimizer state and module source. Larger is refused before it is inflated.
MAX_PICKLE_BYTES = 64 << 20


class ForbiddenGlobal(pickle.UnpicklingError):
    """The file names a global outside :data:`ALLOWED_GLOBALS`; nothing from it was called."""

    def __init__(self, module: str, name: str):
        self.global_name = f"{module}.{name}"
        super().__init__(
            f"refusing to load global {self.global_name!r}: it is not on relaydiff's allow-list of "
            "tensor, container and EDM-persistence globals (loading it could run code)")


_MALFORMED = "malformed checkpoint: "


def _malformed(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(_MALFORMED + what)


# -- records -------------------------------------------------------------------------------

class _NoBuild:
    """Records are immutable once made: a pickle BUILD opcode on one is malformed input."""
    __slots__ = ()

    def __setstate__(self, state):
        raise _malformed(f"unexpected state for a {type(self).__name__}")


class StorageRef(_NoBuild):
    """A flat storage of ``numel`` elements of ``dtype``; ``read(start, stop)`` returns bytes
    ``[start, stop)`` of its raw little-endian data. Nothing is kept in memory between reads: a
    500M-parameter network is loaded tensor by tensor, storages no tensor asks for are never
    read, and a tensor reads only the span of its storage it covers."""
    __slots__ = ("dtype", "numel", "read")

    def __init__(self, dtype: torch.dtype, numel: int, read: Callable[[int, int], bytes] | None = None):
        self.dtype, self.numel, self.read = dtype, numel, read

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def tensor(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` (default: all) as a new 1-D CPU tensor."""
        if self.read is None:
            raise _malformed("a storage has no data record")
        stop = self.numel if stop is None else stop
        size = torch.empty((), dtype=self.dtype).element_size()
        nbytes = (stop - start) * size
        raw = self.read(start * size, stop * size)
        if len(raw) != nbytes:
            raise _malformed(f"a {self.dtype} storage of {self.numel} elements holds {len(raw)} bytes "
                             f"where {nbytes} were expected")
        return torch.frombuffer(bytearray(raw), dtype=self.dtype) if nbytes else torch.empty(0, dtype=self.dtype)


class TensorRef(_NoBuild):
    """A strided view ``(storage, offset, shape, stride)`` of a :class:`StorageRef`."""
    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> torch.Tensor:
        """A new contiguous CPU tensor of :attr:`shape` (reads the span of its storage it covers)."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        last = self.offset + sum((n - 1) * st for n, st in zip(self.shape, self.stride))
        if last >= self.storage.numel:
            raise _malformed(f"a tensor of shape {self.shape} reaches element {last} of a storage of "
                             f"{self.storage.numel}")
        base = self.storage.tensor(self.offset, last + 1)
        return torch.as_strided(base, self.shape, self.stride, 0).clone()


class PersistentRecord(_NoBuild):
    """An EDM ``torch_utils.persistence`` object as the file describes it; never instantiated.

    ``state`` is the object's ``__dict__`` (for a module: ``_parameters``, ``_buffers``,
    ``_modules`` ...); ``init_args``/``init_kwargs`` are its recorded constructor arguments."""
    __slots__ = ("class_name", "state", "module_src", "version")

    def __init__(self, class_name: str, state: dict, module_src: str, version):
        self.class_name, self.state, self.module_src, self.version = class_name, state, module_src, version

    @property
    def init_args(self) -> tuple | None:
        args = self.state.get("_init_args")
        return None if args is None else tuple(args)

    @property
    def init_kwargs(self) -> dict | None:
        return self.state.get("_init_kwargs")

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r})"


class ObjectRecord:
    """An instance of an allowed ordinary class (``ModuleDict``): its name and ``__dict__`` state."""
    qualname = ""
    state: dict | None = None

    def __setstate__(self, state):
        if not isinstance(state, dict) or self.state is not None:
            raise _malformed(f"unexpected state for a {self.qualname}")
        self.state = state

    def __repr__(self) -> str:
        return f"ObjectRecord({self.qualname!r})"


class EasyDictRecord(dict):
    """``dnnlib.util.EasyDict`` read as a plain dict (its items arrive through SETITEMS)."""

    def __setstate__(self, state):
        if state:
            raise _malformed("unexpected attributes on an EasyDict")


def _record_class(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (ObjectRecord,), {"qualname": qualname})


# -- stand-ins for the allowed globals ------------------------------------------------------

class _StorageType(_NoBuild):
    """``torch.FloatStorage`` and friends: only their element type matters."""
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_TYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise _malformed(f"a tensor is built from a {type(storage).__name__}, not a storage")
    size, stride = tuple(size), tuple(stride)
    if (not _is_int(storage_offset) or storage_offset < 0 or len(size) != len(stride)
            or not all(_is_int(v) and v >= 0 for v in size + stride)):
        raise _malformed(f"tensor geometry offset={storage_offset!r} size={size!r} stride={stride!r}")
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise _malformed(f"a parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _reconstruct_persistent_obj(meta) -> PersistentRecord:
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise _malformed("a persistent object without a class name")
    if meta.get("type", "class") != "class":
        raise _malformed(f"persistent object of type {meta.get('type')!r} (expected 'class')")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise _malformed(f"persistent {meta['class_name']} has a {type(state).__name__} state")
    src = meta.get("module_src", "")
    return PersistentRecord(meta["class_name"], state, src if isinstance(src, str) else "", meta.get("version"))


class _Base(_NoBuild):
    """``builtins.object`` / ``builtins.dict``, only as the base argument of ``copyreg._reconstructor``."""
    __slots__ = ()


_OBJECT, _DICT = _Base(), _Base()


def _reconstructor(cls, base, state):
    # protocol 0/1 spelling of "cls.__new__(cls)" (ModuleDict) or "cls(state)" (EasyDict)
    if base is _OBJECT and isinstance(cls, type) and issubclass(cls, ObjectRecord) and state is None:
        return cls()
    if base is _DICT and cls is EasyDictRecord and isinstance(state, dict):
        return EasyDictRecord(state)
    raise _malformed("copyreg._reconstructor outside of its ModuleDict / EasyDict forms")


def _latin1(text, encoding="latin1") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise _malformed("_codecs.encode used for anything but protocol-2 bytes")
    return text.encode("latin1")


class _NumpyDtype:
    """``numpy.dtype(spec, align, copy)`` for numeric scalars; the pickled state sets its byte order."""
    __slots__ = ("spec", "byteorder")

    def __init__(self, spec, align=False, copy=False):
        if not isinstance(spec, str) or not re.fullmatch(r"[biufc]\d{1,2}", spec):
            raise _malformed(f"numpy dtype {spec!r} (only numeric scalars are read)")
        self.spec, self.byteorder = spec, "="

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _malformed("numpy dtype state")
        self.byteorder = state[1]

    def to_numpy(self):
        import numpy as np
        dt = np.dtype(self.spec)
        return dt.newbyteorder(self.byteorder) if self.byteorder in "<>" else dt


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _NumpyDtype):
        raise _malformed("a numpy scalar without a numeric dtype")
    import numpy as np
    dt = dtype.to_numpy()
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise _malformed(f"numpy {dt} scalar payload")
    return np.frombuffer(data, dtype=dt)[0].item()


def _storage_pid(pid) -> tuple[torch.dtype, str, int, Any]:
    """``("storage", storage_type, key, location, numel[, view_metadata])`` -> ``(dtype, key,
    numel, view_metadata)``. The location (``"cuda:0"`` ...) is ignored: data always lands on the CPU."""
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
        kind = pid[0] if isinstance(pid, tuple) and pid else pid
        raise _malformed(f"persistent record {kind!r} (only storages are read)")
    _, stype, key, _location, numel, *view = pid
    if not isinstance(stype, _StorageType) or not isinstance(key, str) or not _is_int(numel) or numel < 0:
        raise _malformed(f"storage record {pid!r}")
    return stype.dtype, key, numel, view[0] if view else None


def read_legacy(blob: bytes | memoryview) -> Any:
    """The object in a legacy (non-zip) ``torch.save`` blob: header pickles, the main pickle,
    the list of storage keys, then per storage an int64 element count and its raw bytes."""
    view = memoryview(blob)
    f = io.BytesIO(view)
    if RestrictedUnpickler(f).load() != LEGACY_MAGIC:
        raise _malformed("not a legacy torch.save file (bad magic number)")
    if RestrictedUnpickler(f).load() != LEGACY_PROTOCOL:
        raise _malformed("unsupported legacy torch.save protocol")
    sys_info = RestrictedUnpickler(f).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
        raise _malformed("big-endian legacy torch.save files are not supported")
    roots: dict[str, StorageRef] = {}

    def persistent_load(pid):
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # legacy torch.save names each nn.Module class with its source (for a diff only)
            if not (isinstance(pid[1], type) and issubclass(pid[1], ObjectRecord)):
                raise _malformed(f"module record {pid[1]!r}")
            return pid[1]
        dtype, key, numel, view_meta = _storage_pid(pid)
        if view_meta is not None:
            raise _malformed("storage views (files from torch < 1.0) are not supported")
        ref = roots.setdefault(key, StorageRef(dtype, numel))
        if (ref.dtype, ref.numel) != (dtype, numel):
            raise _malformed(f"storage {key!r} is described twice differently")
        return ref

    obj = RestrictedUnpickler(f, persistent_load).load()
    keys = RestrictedUnpickler(f).load()
    if not isinstance(keys, list) or set(keys) != set(roots):
        raise _malformed("the storage key list does not match the storages used")
    offset = f.tell()
    for key in keys:
        ref = roots[key]
        numel = int.from_bytes(view[offset:offset + 8], "little", signed=True)
        if numel != ref.numel:
            raise _malformed(f"storage {key!r} has {numel} elements on disk, {ref.numel} in its record")
        start = offset + 8
        offset = start + numel * torch.empty((), dtype=ref.dtype).element_size()
        if offset > len(view):
            raise _malformed("the file ends inside a storage")
        ref.read = lambda a, b, s=start: view[s + a:s + b]
    return obj


def _load_from_bytes(blob) -> StorageRef:
    # EDM pickles carry each storage as the bytes of a legacy torch.save of that storage
    if not isinstance(blob, bytes):
        raise _malformed("torch.storage._load_from_bytes without bytes")
    storage = read_legacy(blob)
    if not isinstance(storage, StorageRef):
        raise _malformed(f"an embedded torch.save blob holds a {type(storage).__name__}, not a storage")
    return storage


_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}   # protocol < 3 module names

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "object"): _OBJECT,
    ("builtins", "dict"): _DICT,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDictRecord,
    ("torch.nn.modules.container", "ModuleDict"): _record_class("torch.nn.modules.container.ModuleDict"),
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_TYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from :data:`ALLOWED_GLOBALS`.

    ``persistent_load`` (torch's storage records) is given per file format; by default a
    persistent id is malformed input."""

    def __init__(self, file, persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file, encoding="utf-8")
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        module = _ALIASES.get(module, module)
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise ForbiddenGlobal(module, name) from None

    def load(self):
        try:
            return super().load()
        except pickle.UnpicklingError as e:
            if isinstance(e, ForbiddenGlobal) or str(e).startswith(_MALFORMED):
                raise
            raise _malformed(f"not a valid pickle ({e})") from None   # "invalid load key", "Memo value ..."
        except Exception as e:   # a stand-in called with the wrong arguments, truncated input, deep nesting ...
            raise _malformed(f"{type(e).__name__}: {e}") from e

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise _malformed("a persistent id in a plain pickle")
        return self._persistent_load(pid)



# -- files ----------------------------------------------------------------------------------

class _ProgressReader(io.RawIOBase):
    """A read-only file that advances a tqdm bar by the bytes read (pickle parsing progress)."""

    def __init__(self, f, bar):
        self._f, self._bar = f, bar

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        self._bar.update(n)
        return n


def _zip_prefix(zf: zipfile.ZipFile) -> str:
    heads = [n[:-len("data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(heads) != 1:
        raise _malformed("a torch zip file must hold exactly one <name>/data.pkl")
    return heads[0]


def _is_torchscript(zf: zipfile.ZipFile, prefix: str) -> bool:
    return any(n.startswith(prefix + "code/") or n == prefix + "constants.pkl" for n in zf.namelist())


def _member(zf: zipfile.ZipFile, name: str, what: str, **limits) -> zipfile.ZipInfo:
    """``name``'s directory entry, the size it declares checked before anything is inflated
    (:func:`relaydiff.zipsizes.check_member`): a member that would inflate to more than its
    reader needs is refused unread."""
    try:
        return checked_member(zf, name, **limits)
    except KeyError:
        raise _malformed(f"{what} has no data record") from None
    except DeclaredSizeError as e:
        raise _malformed(f"{what}: {e}") from None


def _read_torch_zip(zf: zipfile.ZipFile, unpickler: type[RestrictedUnpickler]) -> Any:
    prefix = _zip_prefix(zf)
    if prefix + "byteorder" in zf.namelist():
        if zf.read(_member(zf, prefix + "byteorder", "byteorder", limit=16)).strip() != b"little":
            raise _malformed("big-endian torch files are not supported")
    refs: dict[str, StorageRef] = {}

    def reader(key: str, nbytes: int) -> Callable[[int, int], bytes]:
        def read(start: int, stop: int) -> bytes:
            # a storage's member must inflate to exactly the bytes its record describes
            with zf.open(_member(zf, f"{prefix}data/{key}", f"storage {key!r}", size=nbytes)) as f:
                f.seek(start)
                return f.read(stop - start)
        return read

    def persistent_load(pid):
        dtype, key, numel, _ = _storage_pid(pid)
        ref = refs.get(key)
        if ref is None:
            refs[key] = ref = StorageRef(dtype, numel)
            ref.read = reader(key, ref.nbytes)
        elif (ref.dtype, ref.numel) != (dtype, numel):
            raise _malformed(f"storage {key!r} is described twice differently")
        return ref

    with zf.open(_member(zf, prefix + "data.pkl", "data.pkl", limit=MAX_PICKLE_BYTES)) as f:
        return unpickler(f, persistent_load).load()


def _typed_list(kind: type) -> Callable[[Any], list]:
    def build(items):
        if not isinstance(items, list) or not all(isinstance(v, kind) for v in items):
            raise _malformed(f"a TorchScript {kind.__name__} list holds other values")
        return list(items)
    return build


def _restore_type_tag(value, type_str):
    if not isinstance(type_str, str):
        raise _malformed("a TorchScript type tag is not text")
    return value


# TorchScript's typed-container helpers (torch.jit._pickle): each only checks and returns its input
_TORCHSCRIPT_GLOBALS = {
    "build_intlist": _typed_list(int), "build_doublelist": _typed_list(float),
    "build_boollist": _typed_list(bool), "restore_type_tag": _restore_type_tag,
}


class TorchScriptUnpickler(RestrictedUnpickler):
    """Reads a TorchScript archive's ``data.pkl`` as data: each scripted class
    (``__torch__.<module>.<Name>``) becomes an :class:`ObjectRecord` subclass holding the
    attributes the file stores (parameters, buffers, sub-modules by name). The archive's
    ``code/`` is never compiled and no ``__setstate__`` of the file runs, unlike ``torch.jit.load``."""

    def __init__(self, file, persistent_load=None):
        super().__init__(file, persistent_load)
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = _record_class(qualname)
            return self._classes[qualname]
        if module == "torch.jit._pickle" and name in _TORCHSCRIPT_GLOBALS:
            return _TORCHSCRIPT_GLOBALS[name]
        return super().find_class(module, name)


@contextlib.contextmanager
def open_checkpoint(path: str | os.PathLike, progress: bool = False) -> Iterator[tuple[str, Any]]:
    """Parse ``path`` with the allow-list and yield ``(kind, obj)``: ``kind`` is ``"pickle"``
    (an EDM network pickle), ``"torch-zip"`` (``torch.save``, the default format since torch 1.6),
    ``"torch-legacy"`` or ``"torchscript"`` (``torch.jit.save``: read by :class:`TorchScriptUnpickler`,
    its code never runs); ``obj`` is the top-level object with records in place of tensors and
    network objects. Load :class:`TensorRef` s inside the ``with`` block (zip data is read lazily).

    Raises :class:`ForbiddenGlobal` for a global outside the allow-list and
    ``pickle.UnpicklingError`` for malformed input."""
    from tqdm.auto import tqdm
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(max(len(_LEGACY_HEAD), 9))
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100 << 20:
        # a safetensors file: 8-byte header length, then the JSON header
        raise _malformed("this is a safetensors file, not a pickle or torch file (relaydiff weight files "
                         "load as they are, no conversion needed)")
    if head.startswith(_ZIP_HEAD):
        with zipfile.ZipFile(path) as zf:
            if _is_torchscript(zf, _zip_prefix(zf)):
                yield "torchscript", _read_torch_zip(zf, TorchScriptUnpickler)
            else:
                yield "torch-zip", _read_torch_zip(zf, RestrictedUnpickler)
        return
    if head == _LEGACY_HEAD:
        with open(path, "rb") as f:
            yield "torch-legacy", read_legacy(f.read())
        return
    with open(path, "rb") as raw, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                       desc="reading", disable=not progress, leave=False) as bar:
        obj = RestrictedUnpickler(io.BufferedReader(_ProgressReader(raw, bar))).load()
    yield "pickle", obj
