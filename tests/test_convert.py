"""Importing released EDM ``.pkl`` and RDM ``.pt`` checkpoints (relaydiff.models.convert).

No real checkpoint exists offline, so the tests write files in the same formats: a minimal
stand-in for EDM's ``torch_utils.persistence`` makes relaydiff's own small U-Net pickle to the
same opcodes and globals as an EDM network (each module reduces to
``_reconstruct_persistent_obj({type, version, module_src, class_name, state})``; ModuleDicts
pickle the ordinary way; tensors through ``_rebuild_tensor_v2`` / ``_load_from_bytes``), and
RDM training states are ``torch.save`` zips of ``{optimizer_state, step, ema, net}`` whose
storages are tagged as saved from CUDA. Malicious files carry payloads that create a marker
file when loaded the normal way; a control load shows each payload is live.
"""
from __future__ import annotations

import copy
import io
import math
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from relaydiff.cli import main as cli_main
from relaydiff.config import RelayConfig
from relaydiff.models import (ConversionError, DhariwalUNet, ForbiddenGlobal, convert_checkpoint, convert_release,
                              load_model, load_pretrained, read_meta)
from relaydiff.models import checkpoint as checkpoint_module
from relaydiff.models import convert as convert_module
from relaydiff.models.presets import build_model
from relaydiff.models.safe_pickle import open_checkpoint

# EDM's arguments for a tiny class-conditional ADM (attention at 4x4, 64 channels = one head)
EDM_KWARGS = dict(img_resolution=np.int64(8), img_channels=3, label_dim=4, use_fp16=True, sigma_min=0.002,
                  sigma_max=80.0, sigma_data=0.5, model_type="DhariwalUNet", model_channels=32,
                  channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[4], dropout=0.1,
                  augment_dim=9, label_dropout=0.1)


# -- the format writers ---------------------------------------------------------------------

def _reconstruct_persistent_obj(meta):
    """What EDM's loader does first with every network object: run the embedded module source."""
    exec(meta["module_src"], {})
    return types.SimpleNamespace(**meta)


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class EasyDict(dict):
    pass


EasyDict.__module__ = "dnnlib.util"


# the files written here embed no real network source: every conversion warns (tested in
# test_convert_releases.py)
pytestmark = pytest.mark.filterwarnings("ignore::relaydiff.models.convert.UnknownSourceWarning")


@pytest.fixture(autouse=True)
def one_thread():
    # 8x8 images: thread start-up costs more than it saves, and much more on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def edm_modules(monkeypatch):
    """Install ``torch_utils.persistence`` and ``dnnlib.util`` so pickle can name them while
    writing; they are gone again (and never importable by the converter) after the test."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    for name, mod in [("torch_utils", types.ModuleType("torch_utils")), ("torch_utils.persistence", persistence),
                      ("dnnlib", types.ModuleType("dnnlib")), ("dnnlib.util", util)]:
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    # a payload must never have run through relaydiff; controls delete it themselves
    assert not path.exists()


def _persistent_class(cls, module_src):
    """A subclass of ``cls`` that pickles like an EDM ``@persistent_class`` instance."""
    def __reduce__(self):
        state = self.__getstate__() if isinstance(self, torch.nn.Module) else dict(self.__dict__)
        meta = dict(type="class", version=6, module_src=module_src, class_name=cls.__name__, state=state)
        return _reconstruct_persistent_obj, (meta,)
    return type(cls.__name__, (cls,), {"__reduce__": __reduce__})


def make_persistent(net, module_src, init_kwargs):
    """Turn every module of a tree (but the ModuleDicts, which EDM leaves ordinary) into an EDM
    persistent object recording its constructor arguments, as the decorator does."""
    for m in net.modules():
        if isinstance(m, torch.nn.ModuleDict):
            continue
        m.__class__ = _persistent_class(type(m), module_src)
        m._init_args = ()
        # EDM records e.g. Linear(..., init_weight=np.sqrt(1/3)): numpy scalars in the kwargs
        m._init_kwargs = dict(init_kwargs) if m is net else \
            dict(init_mode="kaiming_uniform", init_weight=np.float64(math.sqrt(1 / 3)))
    return net


class EDMPrecond(torch.nn.Module):
    """EDM's EDMPrecond (constructor and formulas) around relaydiff's DhariwalUNet: the
    original model of these tests."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", eff_attn=False, **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = use_fp16, sigma_min, sigma_max, sigma_data
        self.model = DhariwalUNet(img_resolution=int(img_resolution), in_channels=img_channels,
                                  out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim])
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        return c_skip * x + c_out * self.model(c_in * x, (sigma.log() / 4).flatten(), class_labels)


def edm_network(seed=0, **overrides):
    """An EDM-layout EDMPrecond with every tensor random (so a swap of any two would show)."""
    kwargs = {**EDM_KWARGS, **overrides}
    torch.manual_seed(seed)
    net = EDMPrecond(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval().requires_grad_(False), kwargs


class Loss:
    """EDM's EDMLoss / RDM's BlurLoss are plain persistent objects holding their settings."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def _loss(name, module_src, **attrs):
    loss = Loss(**attrs)
    loss.__class__ = _persistent_class(type(name, (Loss,), {}), module_src)
    loss._init_args, loss._init_kwargs = (), dict(attrs)
    return loss


def write_edm_pkl(path, net, kwargs, module_src, protocol=4, loss=None, extra=None):
    """An EDM network snapshot: ``pickle.dump(dict(ema, loss_fn, augment_pipe, dataset_kwargs))``."""
    ema = make_persistent(copy.deepcopy(net), module_src, kwargs)
    data = dict(ema=ema, loss_fn=loss if loss is not None else _loss("EDMLoss", module_src, P_mean=-1.2,
                                                                     P_std=1.2, sigma_data=0.5),
                augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip",
                                    resolution=16, extra=EasyDict(xflip=False)))
    data.update(extra or {})
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


def write_rdm_pt(path, ema_net, kwargs, module_src, monkeypatch, zip_format=True):
    """An RDM training state ``torch.save(dict(optimizer_state, step, ema, net))`` with CUDA-tagged
    storages. Returns the number of optimizer storages (saved first: keys 0..n-1)."""
    # the raw training weights, of the EMA's architecture: different from the EMA
    net, _ = edm_network(seed=1, **{k: v for k, v in kwargs.items() if k in EDM_KWARGS})
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    n_opt = sum(isinstance(v, torch.Tensor) for s in state["state"].values() for v in s.values())
    data = dict(optimizer_state=state, step=123_456,
                ema=make_persistent(copy.deepcopy(ema_net), module_src, {**kwargs, "eff_attn": True}),
                net=make_persistent(net.requires_grad_(False), module_src, kwargs))
    with monkeypatch.context() as m:   # what the authors' files hold: storages saved from the GPU
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(data, path, _use_new_zipfile_serialization=zip_format)
    return n_opt


def _inputs(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 8, 8, generator=g)
    sigma = torch.exp(torch.randn(b, generator=g) * 1.2 - 1.2)
    labels = torch.eye(4)[torch.randint(0, 4, (b,), generator=g)]
    return x, sigma, labels


def assert_same_tensors(converted, original):
    got, want = converted.state_dict(), original.state_dict()
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t), name


def assert_same_model(converted, original):
    """Every tensor by name, and the outputs on the same inputs."""
    assert_same_tensors(converted, original)
    x, sigma, labels = _inputs()
    with torch.no_grad():
        # the U-Net alone runs the same code on the same weights: bit-identical
        noise = sigma.log() / 4
        assert torch.equal(converted.model(x, noise, labels), original.model(x, noise, labels))
        for cl in (labels, None):
            out, ref = converted(x, sigma, cl), original(x, sigma, cl)
            # the preconditioning coefficients are computed in a different order in float32
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _control_load(path, marker, torch_file=False):
    """A normal load of ``path`` (what EDM's and RDM's own code do) runs its payload."""
    try:
        if torch_file:
            torch.load(path, weights_only=False)
        else:
            with open(path, "rb") as f:
                pickle.load(f)
    except Exception:
        pass
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


def _touch_src(marker) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nraise RuntimeError('payload ran')\n"


# -- EDM pickles ----------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_edm_pkl_converts_exactly_and_never_runs_embedded_source(tmp_path, edm_modules, marker, protocol):
    net, kwargs = edm_network()
    src = write_edm_pkl(tmp_path / "edm.pkl", net, kwargs, _touch_src(marker), protocol=protocol)
    assert _control_load(src, marker), "the embedded module source should run under a plain pickle.load"
    sys.modules.pop("torch_utils.persistence")   # the converter must not need (or find) EDM's code

    dst, meta = convert_checkpoint(src, tmp_path / "edm.safetensors")
    assert read_meta(dst) == meta | {"format": 1}
    assert meta["stage"] == "base" and meta["relay"] is None
    assert meta["network"] == dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, augment_dim=9,
                                   model_channels=32, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                                   attn_resolutions=[4], dropout=0.1, label_dropout=0.1)
    assert meta["precond"] == dict(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    assert meta["source"]["use_fp16"] is True and meta["source"]["format"] == "pickle"
    assert meta["source"]["init_kwargs"]["img_resolution"] == 8   # numpy scalar read as a number

    assert_same_model(load_model(dst)[0], net)
    for model, _ in (load_pretrained(dst), load_pretrained(src)):
        assert_same_tensors(model, net)


def test_edm_pkl_relay_settings_come_from_blur_loss(tmp_path, edm_modules, marker):
    net, kwargs = edm_network()
    loss = _loss("BlurLoss", "", P_mean=-1.1, P_std=1.3, sigma_data=0.5, up_scale=4, prob_length=0.89,
                 blur_sigma_max=2.0, min_scale=0.002, block_scale=0.15)
    src = write_edm_pkl(tmp_path / "rdm.pkl", net, kwargs, "", loss=loss)
    _, meta = convert_release(src)
    assert meta["stage"] == "relay"
    assert meta["relay"] == RelayConfig(patch_size=4, block_size=4, alpha=0.15, truncation=0.89, blur_sigma_max=2.0,
                                        min_scale=0.002, p_mean=-1.1, p_std=1.3, normalize_noise=False).to_dict()
    with pytest.raises(ValueError, match="base"):
        convert_release(src, stage="base", relay="imagenet256")


# -- RDM training states --------------------------------------------------------------------

@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_rdm_pt_reads_ema_only_from_cuda_tagged_storages(tmp_path, edm_modules, monkeypatch, zip_format):
    ema, kwargs = edm_network(seed=2)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("sigma_min", "sigma_max")}   # EDM's defaults: 0, inf
    src = tmp_path / "state.pt"
    n_opt = write_rdm_pt(src, ema, kwargs, "", monkeypatch, zip_format=zip_format)
    if zip_format:
        with zipfile.ZipFile(src) as zf:
            prefix = zf.namelist()[0].split("/")[0] + "/"
            assert b"cuda:0" in zf.read(prefix + "data.pkl")
            # drop the optimizer's data: a reader that touched it would fail
            dropped = {f"{prefix}data/{k}" for k in range(n_opt)}
            entries = [(i, zf.read(i)) for i in zf.infolist() if i.filename not in dropped]
        assert len(dropped) > 0
        with zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as zf:
            for info, data in entries:
                zf.writestr(info, data)

    with pytest.raises(ValueError, match="stage"):
        convert_release(src)
    dst, meta = convert_checkpoint(src, tmp_path / "relay.safetensors", relay="celebahq256")
    assert meta["stage"] == "relay"
    assert meta["relay"] == RelayConfig.celebahq256(normalize_noise=False).to_dict()
    assert meta["kimg"] == 123.456 and meta["source"]["nimg"] == 123_456
    assert meta["precond"] == dict(sigma_data=0.5, sigma_min=0.0, sigma_max=math.inf)
    assert read_meta(dst) == meta | {"format": 1}
    assert meta["source"]["dropped_kwargs"] == {"eff_attn": True}
    assert_same_model(load_model(dst)[0], ema)
    assert convert_release(src, stage="base")[1]["stage"] == "base"


@pytest.mark.parametrize("release", ["imagenet", "celebahq"])
def test_converted_rdm_relay_stage_samples_on_its_stage1(tmp_path, edm_modules, monkeypatch, capsys, release):
    """The authors' released pairs at small size (8 -> 32 px), converted as docs/pretrained.md
    says and sampled end to end by ``relaydiff sample`` with their sampler preset, classes and
    post-processing. ImageNet: an EDM pickle stage 1 (class-conditional ADM,
    ``imagenet_first_stage.pkl``) under an RDM ``.pt`` relay stage (``--relay imagenet256``);
    CelebA-HQ: an RDM ``.pt`` stage 1 (``--stage base``) under an RDM ``.pt`` relay stage
    (``--relay celebahq256``), both unconditional. The PNGs are the pipeline's images for the
    same seeds, classes ``seed % label_dim``, through the authors' save_samples."""
    from test_convert_releases import check_sample_folder, sample_argv

    from relaydiff.images import authors_postprocess
    from relaydiff.pipeline import RelayPipeline
    label_dim = 4 if release == "imagenet" else 0
    edm_defaults = ("sigma_min", "sigma_max")   # an RDM state records EDM's defaults 0, inf
    base, base_kwargs = edm_network(seed=4, label_dim=label_dim)
    relay, relay_kwargs = edm_network(seed=5, label_dim=label_dim, img_resolution=32)   # patch size 4
    relay_kwargs = {k: v for k, v in relay_kwargs.items() if k not in edm_defaults}
    if release == "imagenet":
        base_src = write_edm_pkl(tmp_path / "imagenet_first_stage.pkl", base, base_kwargs, "")
        base_flags = []
    else:
        base_kwargs = {k: v for k, v in base_kwargs.items() if k not in edm_defaults}
        base_src = tmp_path / "celebahq_first_stage.pt"
        write_rdm_pt(base_src, base, base_kwargs, "", monkeypatch)
        base_flags = ["--stage", "base"]
    relay_src = tmp_path / f"{release}_second_stage.pt"
    write_rdm_pt(relay_src, relay, relay_kwargs, "", monkeypatch)
    base_dst, relay_dst = tmp_path / "base.safetensors", tmp_path / "relay.safetensors"
    assert cli_main(["convert", str(base_src), str(base_dst), "--quiet", *base_flags]) == 0
    assert cli_main(["convert", str(relay_src), str(relay_dst), "--quiet", "--relay", f"{release}256"]) == 0
    want = RelayConfig.imagenet256 if release == "imagenet" else RelayConfig.celebahq256
    assert read_meta(relay_dst)["relay"] == want(normalize_noise=False).to_dict()
    assert read_meta(base_dst)["stage"] == "base" and read_meta(relay_dst)["stage"] == "relay"
    capsys.readouterr()

    preset = f"authors-{release}256"
    out, seeds = tmp_path / "samples", [5, 0, 2]
    rc = cli_main(sample_argv(base_dst, [relay_dst], out, "--seeds", "5,0,2", "--steps", "4,8", "--batch", "2",
                              "--preset", preset, "--post", "authors-enhance"))
    assert rc == 0, capsys.readouterr().err
    pipe = RelayPipeline.from_checkpoints(base_dst, relay_dst, sampler=preset)
    assert pipe.out_shape == (3, 32, 32) and pipe.label_dim == label_dim
    labels = [s % label_dim for s in seeds] if label_dim else None       # the authors' classes
    high = pipe.sample(seeds=seeds, class_labels=labels, steps=(4, 8), disable=True)
    assert pipe.last_nfe == {"stage1": 7, "relay": 2 * (len(pipe.relay_sigmas((4, 8))) - 1) - 1}
    check_sample_folder(out, seeds, high, high_u8=authors_postprocess(high, f"authors-enhance-{release}256"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rdm_pt_saved_from_real_cuda_tensors(tmp_path, edm_modules):
    ema, kwargs = edm_network(seed=3)
    src = tmp_path / "cuda.pt"
    torch.save(dict(step=0, ema=make_persistent(copy.deepcopy(ema).cuda(), "", kwargs)), src)
    model, meta = convert_release(src, stage="base")
    assert meta["source"]["format"] == "torch-zip"
    assert_same_model(model, ema)


# -- refusing code --------------------------------------------------------------------------

class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class StoragePayload:
    """A storage as EDM pickles hold them, a legacy torch.save blob, that carries the payload."""

    def __init__(self, marker):
        buf = io.BytesIO()
        torch.save(Payload(marker), buf, _use_new_zipfile_serialization=False)
        self.blob = buf.getvalue()

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.blob,)


class TensorPayload:
    def __init__(self, marker):
        self.storage = StoragePayload(marker)

    def __deepcopy__(self, memo):   # a copy through __reduce__ would load the blob, i.e. run the payload
        return self

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (2,), (1,), False, {})


@pytest.mark.parametrize("where", ["ema", "dataset_kwargs", "storage", "pt-optimizer", "pt-legacy"])
def test_payload_is_refused_without_running(tmp_path, edm_modules, marker, where, monkeypatch):
    net, kwargs = edm_network()
    src = tmp_path / "evil"
    if where == "ema":
        with open(src, "wb") as f:
            pickle.dump(dict(ema=Payload(marker)), f)
    elif where == "dataset_kwargs":
        write_edm_pkl(src, net, kwargs, "", extra=dict(dataset_kwargs=dict(path=Payload(marker))))
    elif where == "storage":
        net.model.map_layer0._parameters["weight"] = TensorPayload(marker)
        write_edm_pkl(src, net, kwargs, "")
    else:
        torch.save(dict(optimizer_state=dict(state={0: Payload(marker)}), step=0,
                        ema=make_persistent(copy.deepcopy(net), "", kwargs)),
                   src, _use_new_zipfile_serialization=where == "pt-optimizer")

    with pytest.raises(ForbiddenGlobal, match="posix.system") as err:
        convert_checkpoint(src, tmp_path / "out.safetensors", stage="base")
    assert err.value.global_name == "posix.system"
    assert not (tmp_path / "out.safetensors").exists()
    assert not marker.exists()
    assert _control_load(src, marker, torch_file=where.startswith("pt")), "the payload should run under a normal load"


def test_only_allowed_globals_are_resolved(tmp_path):
    for module, name in [("builtins", "eval"), ("torch", "load"), ("numpy", "load"), ("collections", "deque"),
                         ("torch.nn.modules.linear", "Linear"), ("torch_utils.persistence", "_src_to_module")]:
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")
        with pytest.raises(ForbiddenGlobal, match=f"{module}.{name}"):
            with open_checkpoint(path):
                pass


# -- reporting what does not fit ------------------------------------------------------------

def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, edm_modules):
    net, kwargs = edm_network()
    del net.model.map_layer0._parameters["bias"]
    net.model.out_conv.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))
    net.model.enc["8x8_conv"].weight = torch.nn.Parameter(torch.zeros(32, 3, 1, 1))
    src = write_edm_pkl(tmp_path / "bad.pkl", net, kwargs, "")
    with pytest.raises(ConversionError) as err:
        convert_release(src)
    e = err.value
    assert e.missing == ["model.map_layer0.bias"] and e.unexpected == ["model.out_conv.extra"]
    assert e.mismatched == [("model.enc.8x8_conv.weight", (32, 3, 1, 1), (32, 3, 3, 3))]
    for name in ("model.map_layer0.bias", "model.out_conv.extra", "model.enc.8x8_conv.weight"):
        assert name in str(e)


def test_declared_network_is_checked_before_anything_is_built(tmp_path, edm_modules, monkeypatch):
    # the tiny network's tensors under arguments that declare model_channels=512 (2.1 G
    # parameters at full size): refused from the meta-device shapes, no real model built
    net, kwargs = edm_network()
    src = write_edm_pkl(tmp_path / "big.pkl", net, {**kwargs, "model_channels": 512, "num_blocks": 4}, "")

    def meta_only(*args, **kw):
        model = build_model(*args, **kw)
        assert next(model.parameters()).is_meta, "a real model was built before the tensors were checked"
        return model

    monkeypatch.setattr(checkpoint_module, "build_model", meta_only)
    monkeypatch.setattr(convert_module, "build_model", meta_only)
    with pytest.raises(ConversionError, match="do not fit"):
        convert_release(src)


@pytest.mark.parametrize("change, message", [
    (dict(class_name="RectifiedPrecond"), "RectifiedPrecond"),
    (dict(model_type="UViT"), "UViT"),
    (dict(channels_per_head=32), "channels_per_head"),
    (dict(resample_filter=True), "resampling filter"),
])
def test_unsupported_networks_are_refused_by_name(tmp_path, edm_modules, change, message):
    net, kwargs = edm_network()
    if "class_name" in change:
        net.__class__ = type(change["class_name"], (EDMPrecond,), {})
    elif "resample_filter" in change:
        net.model.enc["4x4_down"].conv0.resample_filter.copy_(torch.tensor([[1.0, 3.0], [3.0, 9.0]]) / 16)
    else:
        kwargs = {**kwargs, **change}
    src = write_edm_pkl(tmp_path / "net.pkl", net, kwargs, "")
    with pytest.raises(ConversionError, match=message):
        convert_release(src)


# -- command line ---------------------------------------------------------------------------

def test_cli_converts_and_reports(tmp_path, edm_modules, capsys):
    net, kwargs = edm_network()
    src = write_edm_pkl(tmp_path / "edm.pkl", net, kwargs, "")
    dst = tmp_path / "edm.safetensors"
    assert cli_main(["convert", str(src), str(dst), "--quiet"]) == 0
    assert "base model, 8px, label_dim 4" in capsys.readouterr().out
    assert_same_model(load_model(dst)[0], net)
    # an existing output is kept unless --force
    assert cli_main(["convert", str(src), str(dst), "--quiet"]) == 2
    assert cli_main(["convert", str(src), str(dst), "--quiet", "--force"]) == 0


@pytest.mark.parametrize("case", ["payload", "missing-src", "suffix", "no-stage", "garbage"])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path, edm_modules, marker, monkeypatch, capsys, case):
    net, kwargs = edm_network()
    src, dst, extra = tmp_path / "src.pkl", tmp_path / "out.safetensors", []
    if case == "payload":
        src.write_bytes(pickle.dumps(dict(ema=Payload(marker))))
    elif case == "suffix":
        write_edm_pkl(src, net, kwargs, "")
        dst = tmp_path / "out.pt"
    elif case == "no-stage":
        src = tmp_path / "src.pt"
        write_rdm_pt(src, net, kwargs, "", monkeypatch)
    elif case == "garbage":
        src.write_bytes(b"\x80\x04not a pickle")
    assert cli_main(["convert", str(src), str(dst), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relaydiff convert: error:") and "\n" not in err
    assert not dst.exists() and list(tmp_path.glob("*.tmp")) == []
    if case == "payload":
        assert "posix.system" in err
