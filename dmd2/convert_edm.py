"""``dmd2 convert-edm``: an NVlabs EDM network pickle to a class-conditional EDM teacher folder.

EDM's pickles (e.g. ``edm-imagenet-64x64-cond-adm.pkl``) hold their networks as
``torch_utils.persistence`` objects that carry the source code of their classes. This module
reads them without EDM's code and without running anything they embed: a restricted unpickler
turns every persistent object into an inert record (class name + state, the object's
``__dict__``), rebuilds tensors the way ``torch.load(weights_only=True)`` does, and refuses every
other global. The network must be ``EDMPrecond`` around ``DhariwalUNet`` (ADM); its layers map
one to one onto a diffusers ``UNet2DModel`` with ``scale_shift`` resnets, resnet down/upsamplers
and a class embedding, and ``schedule.EDMSchedule`` applies EDMPrecond's preconditioning
(c_skip, c_out, c_in, c_noise = ln(sigma)/4) around it.

    OUT/unet/             UNet2DModel, float32 safetensors
    OUT/scheduler/        EDMEulerScheduler: the pickle's sigma_data; its sigma range within 0.002..80
    OUT/edm_source.json   the pickle's sha256, class names and constructor arguments
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch

from .errors import UserError
from .files import sha256_file

SUPPORTED = "EDMPrecond(DhariwalUNet), the ADM architecture of e.g. edm-imagenet-64x64-cond-adm.pkl"
# EDM's sampler clamps its noise range to the network's: max(0.002, net.sigma_min), min(80, net.sigma_max).
# EDMPrecond's own defaults are 0 and inf, which a Karras grid cannot hold.
SAMPLER_SIGMA_MIN, SAMPLER_SIGMA_MAX = 0.002, 80.0


# --- reading the pickle: inert records, tensors, nothing executed -------------------------------


class Persistent:
    """A ``torch_utils.persistence`` object: its class name and state. Its source is never run."""

    def __init__(self, class_name: str, state: dict, module_src_sha256: str | None):
        self.class_name = class_name
        self.state = state
        self.module_src_sha256 = module_src_sha256

    def __repr__(self) -> str:
        return f"<{self.class_name}>"


class StandIn(dict):
    """Stands in for a class the pickle names (``dnnlib.EasyDict``, torch containers): it keeps
    the items, arguments and state the pickle gives it and never calls the real class."""

    qualname = "?"
    state = None
    args: tuple = ()

    def __init__(self, *args, **kwargs):  # called only if the pickle REDUCEs the class itself
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


_STANDINS: dict[str, type] = {}


def _standin(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _STANDINS:
        _STANDINS[key] = type(name, (StandIn,), {"qualname": key})
    return _STANDINS[key]


class _Refused(Exception):
    pass


def _reconstruct_persistent_obj(meta):
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
            and isinstance(meta.get("state"), dict)):
        raise _Refused("a torch_utils.persistence record without a class name and state")
    src = meta.get("module_src")
    digest = hashlib.sha256(src.encode("utf-8", "replace")).hexdigest() if isinstance(src, str) else None
    return Persistent(meta["class_name"], meta["state"], digest)


def _load_from_bytes(b):
    """A storage pickled as ``torch.save`` bytes, loaded with ``weights_only=True`` (torch's own
    ``torch.storage._load_from_bytes`` would run those bytes as an unrestricted pickle)."""
    if not isinstance(b, bytes):
        raise _Refused("a storage that is not bytes")
    storage = torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise _Refused(f"a storage that loads as {type(storage).__name__}")
    return storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise _Refused("a tensor whose storage is not a torch storage")
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise _Refused("a parameter that is not a tensor")
    return data


class _NumpyDtype:
    """``numpy.dtype(name, align, copy)`` as the pickle names it: only its name and state are kept."""

    def __init__(self, name, align=False, copy=False):
        self.name = name
        self.state = None

    def __setstate__(self, state):
        self.state = state


_NUMPY_NUMBERS = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"}


def _numpy_scalar(dtype, data=None):
    """A numpy number (EDM keeps ``np.sqrt(1/3)`` in its layers' init kwargs) as a Python number."""
    if not (isinstance(dtype, _NumpyDtype) and dtype.name in _NUMPY_NUMBERS and isinstance(data, bytes)):
        raise _Refused("a numpy scalar that is not a plain number")
    import numpy as np

    order = dtype.state[1] if isinstance(dtype.state, tuple) and len(dtype.state) > 1 else "="
    dt = np.dtype(dtype.name).newbyteorder(order if order in ("<", ">", "=", "|") else "=")
    return np.frombuffer(data, dtype=dt, count=1)[0].item()


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}
_TORCH_CONTAINERS = {"ModuleDict", "ModuleList", "Sequential"}


class _EDMUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return _reconstruct_persistent_obj
        if module.split(".")[0] in ("torch_utils", "dnnlib") and name[:1].isupper():
            return _standin(module, name)
        if module == "torch.nn.modules.container" and name in _TORCH_CONTAINERS:
            return _standin(module, name)
        raise _Refused(f"it names {module}.{name}, which an EDM network pickle does not need")


def read_edm_pickle(path: str | Path):
    """The pickle's top-level object, with persistent objects as ``Persistent`` records."""
    try:
        with open(path, "rb") as f:
            return _EDMUnpickler(f).load()
    except _Refused as e:
        raise UserError(f"{path}: refused to load: {e} (nothing in it was run)") from None
    except Exception as e:  # a damaged or foreign pickle fails in many ways; each is one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable EDM network pickle ({first})") from None


# --- the architecture ------------------------------------------------------------------------------


def _name(obj) -> str:
    if isinstance(obj, Persistent):
        return obj.class_name
    if isinstance(obj, StandIn):
        return obj.qualname
    return type(obj).__name__


def _state(obj) -> dict:
    if isinstance(obj, Persistent):
        return obj.state
    if isinstance(obj, StandIn) and isinstance(obj.state, dict):
        return obj.state
    return {}


def _children(obj) -> dict:
    mods = _state(obj).get("_modules")
    return dict(mods) if isinstance(mods, dict) else {}


def _kwargs(obj) -> dict:
    st = _state(obj)
    kw = st.get("_init_kwargs", st.get("init_kwargs"))
    return dict(kw) if isinstance(kw, dict) else {}


@dataclass
class _Mapper:
    """Walks the DhariwalUNet records and fills a diffusers UNet2DModel state dict."""

    where: str
    sd: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)  # "resnet"/"attn" -> {num_groups: first path}
    eps: dict = field(default_factory=dict)
    head_dims: dict = field(default_factory=dict)
    dropouts: dict = field(default_factory=dict)

    def fail(self, path: str, what: str) -> UserError:
        return UserError(f"{self.where}: {path}: {what}; dmd2 convert-edm supports {SUPPORTED}")

    def expect(self, obj, cls: str, path: str):
        if _name(obj) != cls:
            raise self.fail(path, f"is {_name(obj) if obj is not None else 'missing'}, expected {cls}")
        return obj

    def child(self, obj, name: str, path: str, cls: str):
        return self.expect(_children(obj).get(name), cls, f"{path}.{name}")

    def tensor(self, obj, name: str, path: str, required: bool = True):
        st = _state(obj)
        for holder in (st.get("_parameters"), st.get("_buffers"), st):
            if isinstance(holder, dict) and holder.get(name) is not None:
                t = holder[name]
                if not isinstance(t, torch.Tensor):
                    raise self.fail(f"{path}.{name}", "is not a tensor")
                return t.detach().to(torch.float32).contiguous()
        if required:
            raise self.fail(f"{path}.{name}", "is missing")
        return None

    def norm(self, key: str, obj, path: str, kind: str = "resnet") -> None:
        self.expect(obj, "GroupNorm", path)
        st = _state(obj)
        self.groups.setdefault(kind, {}).setdefault(int(st.get("num_groups", 32)), path)
        self.eps.setdefault(float(st.get("eps", 1e-5)), path)
        self.sd[f"{key}.weight"] = self.tensor(obj, "weight", path)
        self.sd[f"{key}.bias"] = self.tensor(obj, "bias", path)

    def conv(self, key: str | None, obj, path: str, *, kernel: int, up=False, down=False) -> torch.Tensor | None:
        """EDM's Conv2d: resampling first (a [1,1] filter: 2x2 average pool / nearest upsampling), then the conv."""
        self.expect(obj, "Conv2d", path)
        st = _state(obj)
        if bool(st.get("up")) != up or bool(st.get("down")) != down:
            raise self.fail(path, f"resamples (up={st.get('up')}, down={st.get('down')}) where ADM does not")
        if st.get("fused_resample"):
            raise self.fail(path, "uses fused_resample")
        if up or down:
            f = self.tensor(obj, "resample_filter", path)
            if f.shape != (1, 1, 2, 2) or not torch.allclose(f, torch.full_like(f, 0.25)):
                raise self.fail(path, "resample_filter is not [1, 1]")
        w = self.tensor(obj, "weight", path, required=False)
        if w is None:
            if kernel:
                raise self.fail(path, "has no weight")
            return None
        if w.ndim != 4 or w.shape[-2:] != (kernel, kernel):
            raise self.fail(path, f"weight {tuple(w.shape)} is not a {kernel}x{kernel} kernel")
        b = self.tensor(obj, "bias", path, required=False)
        self.sd[f"{key}.weight"] = w
        self.sd[f"{key}.bias"] = b if b is not None else torch.zeros(w.shape[0])
        return w

    def linear(self, key: str, obj, path: str) -> torch.Tensor:
        self.expect(obj, "Linear", path)
        w = self.tensor(obj, "weight", path)
        b = self.tensor(obj, "bias", path, required=False)
        self.sd[f"{key}.weight"] = w
        self.sd[f"{key}.bias"] = b if b is not None else torch.zeros(w.shape[0])
        return w

    def resnet(self, key: str, block, path: str, *, up=False, down=False) -> None:
        """UNetBlock's resnet part: norm0 conv0 (resampled) affine(scale, shift) norm1 conv1 + skip."""
        self.expect(block, "UNetBlock", path)
        st = _state(block)
        if st.get("adaptive_scale", True) is not True:
            raise self.fail(path, "has adaptive_scale=False")
        if float(st.get("skip_scale", 1)) != 1.0:
            raise self.fail(path, f"has skip_scale={st.get('skip_scale')}")
        self.dropouts.setdefault(float(st.get("dropout", 0) or 0), path)
        kids = _children(block)
        self.norm(f"{key}.norm1", kids.get("norm0"), f"{path}.norm0")
        w = self.conv(f"{key}.conv1", kids.get("conv0"), f"{path}.conv0", kernel=3, up=up, down=down)
        cout, cin = w.shape[:2]
        aff = self.linear(f"{key}.time_emb_proj", kids.get("affine"), f"{path}.affine")
        if aff.shape[0] != 2 * cout:
            raise self.fail(f"{path}.affine", f"has {aff.shape[0]} outputs, expected scale and shift ({2 * cout})")
        self.norm(f"{key}.norm2", kids.get("norm1"), f"{path}.norm1")
        self.conv(f"{key}.conv2", kids.get("conv1"), f"{path}.conv1", kernel=3)
        skip = kids.get("skip")
        if cin != cout:
            self.conv(f"{key}.conv_shortcut", skip, f"{path}.skip", kernel=1, up=up, down=down)
        elif up or down:  # resampling only (kernel 0): what diffusers' resnet does to its input
            if self.conv(None, skip, f"{path}.skip", kernel=0, up=up, down=down) is not None:
                raise self.fail(f"{path}.skip", "projects the resampled input (resample_proj)")
        elif skip is not None:
            raise self.fail(f"{path}.skip", "exists where channels and resolution are unchanged")

    def attention(self, key: str, block, path: str, kind: str = "resnet") -> None:
        """qkv's 3C outputs are laid out [head][channel][q/k/v]: row 3m + j is q/k/v (j) of channel m."""
        kids = _children(block)
        heads = int(_state(block).get("num_heads") or 0)
        self.norm(f"{key}.group_norm", kids.get("norm2"), f"{path}.norm2", kind)
        qkv_path = f"{path}.qkv"
        self.expect(kids.get("qkv"), "Conv2d", qkv_path)
        w = self.tensor(kids["qkv"], "weight", qkv_path)
        b = self.tensor(kids["qkv"], "bias", qkv_path, required=False)
        c = w.shape[1]
        if w.shape != (3 * c, c, 1, 1) or c % heads:
            raise self.fail(qkv_path, f"weight {tuple(w.shape)} does not fit {heads} heads")
        self.head_dims.setdefault(c // heads, path)
        w = w.reshape(c, 3, c)
        b = (b if b is not None else torch.zeros(3 * c)).reshape(c, 3)
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            self.sd[f"{key}.{name}.weight"] = w[:, j].contiguous()
            self.sd[f"{key}.{name}.bias"] = b[:, j].contiguous()
        proj = self.expect(kids.get("proj"), "Conv2d", f"{path}.proj")
        pw = self.tensor(proj, "weight", f"{path}.proj")
        pb = self.tensor(proj, "bias", f"{path}.proj", required=False)
        self.sd[f"{key}.to_out.0.weight"] = pw.reshape(pw.shape[0], pw.shape[1])
        self.sd[f"{key}.to_out.0.bias"] = pb if pb is not None else torch.zeros(pw.shape[0])

    def one(self, values: dict, what: str):
        if len(values) != 1:
            raise UserError(f"{self.where}: {what} differs across layers ({', '.join(f'{k} at {v}' for k, v in values.items())}); "
                            "diffusers' UNet2DModel has one value")
        return next(iter(values))


_KEY = re.compile(r"^(\d+)x(\d+)_(conv|down|up|in0|in1|block(\d+))$")


def _has_attention(block) -> bool:
    return int(_state(block).get("num_heads") or 0) > 0


def _map_level(mp, key: str, lv: dict, where: str) -> bool:
    """One resolution level's blocks onto ``key``'s resnets (and attentions); True when they have
    attention (all of them or none: a diffusers block type has it everywhere or nowhere)."""
    attn = {_has_attention(b) for _, b in lv["blocks"]}
    if len(attn) != 1:
        raise mp.fail(f"{where}.{lv['res']}x{lv['res']}", "has attention in some blocks only")
    for i, (path, block) in enumerate(lv["blocks"]):
        mp.resnet(f"{key}.resnets.{i}", block, path)
        if _has_attention(block):
            mp.attention(f"{key}.attentions.{i}", block, path)
    return attn == {True}


def _map_resample(mp, key: str, path: str, block, **updown) -> None:
    """A level's _down / _up block onto the diffusers down/upsampler ``key`` (a resnet, no attention)."""
    if _has_attention(block):
        raise mp.fail(path, "has attention")
    mp.resnet(key, block, path, **updown)


def _levels(mapper: _Mapper, container, path: str, first: tuple[str, ...], later: str) -> list[dict]:
    """A ModuleDict's keys as levels: [{res, head: {name: block}, blocks: [...]}], in order."""
    levels: list[dict] = []
    for name, block in _children(container).items():
        m = _KEY.match(name)
        if not m or m.group(1) != m.group(2):
            raise mapper.fail(f"{path}.{name}", "is not a DhariwalUNet layer name")
        res, kind = int(m.group(1)), m.group(3)
        if kind.startswith("block"):
            if not levels or levels[-1]["res"] != res or int(m.group(4)) != len(levels[-1]["blocks"]):
                raise mapper.fail(f"{path}.{name}", "is out of DhariwalUNet's order")
            levels[-1]["blocks"].append((f"{path}.{name}", block))
            continue
        wanted = first if not levels else (later,)
        if levels and levels[-1]["res"] == res and not levels[-1]["blocks"] and len(first) > 1:
            levels[-1]["head"][kind] = (f"{path}.{name}", block)  # the mid block's second layer
            continue
        if kind not in wanted:
            raise mapper.fail(f"{path}.{name}", "is out of DhariwalUNet's order")
        levels.append({"res": res, "head": {kind: (f"{path}.{name}", block)}, "blocks": []})
    return levels


def map_dhariwal_unet(model, where: str) -> tuple[dict, dict]:
    """(UNet2DModel config, its state dict) from a DhariwalUNet record."""
    mp = _Mapper(where)
    p = "model"
    kids = _children(model)
    enc = mp.child(model, "enc", p, "torch.nn.modules.container.ModuleDict")
    dec = mp.child(model, "dec", p, "torch.nn.modules.container.ModuleDict")
    down = _levels(mp, enc, f"{p}.enc", ("conv",), "down")
    up = _levels(mp, dec, f"{p}.dec", ("in0", "in1"), "up")
    if not down or not up:
        raise mp.fail(p, "has no encoder or decoder")
    resolutions = [lv["res"] for lv in down]
    if [lv["res"] for lv in up] != resolutions[::-1] or any(b != a // 2 for a, b in pairwise(resolutions)):
        raise mp.fail(p, f"encoder resolutions {resolutions} and decoder {[lv['res'] for lv in up]} do not mirror")
    num_blocks = mp.one({len(lv["blocks"]): f"{p}.enc.{lv['res']}x{lv['res']}" for lv in down}, "blocks per level")
    if num_blocks < 1 or any(len(lv["blocks"]) != num_blocks + 1 for lv in up):
        raise mp.fail(f"{p}.dec", f"levels do not hold num_blocks + 1 = {num_blocks + 1} blocks")
    if list(up[0]["head"]) != ["in0", "in1"]:
        raise mp.fail(f"{p}.dec", "does not start with the _in0 and _in1 blocks")

    # the embedding: map_noise -> map_layer0 -> silu -> map_layer1, + map_label(onehot)
    noise = mp.child(model, "map_noise", p, "PositionalEmbedding")
    nst = _state(noise)
    if nst.get("endpoint", False) or int(nst.get("max_positions", 10000)) != 10000:
        raise mp.fail(f"{p}.map_noise", "is not a 10000-period embedding without endpoint")
    w0 = mp.linear("time_embedding.linear_1", kids.get("map_layer0"), f"{p}.map_layer0")
    mp.linear("time_embedding.linear_2", kids.get("map_layer1"), f"{p}.map_layer1")
    label = kids.get("map_label")
    if label is None:
        raise UserError(f"{where}: the network is unconditional (label_dim 0); dmd2 convert-edm writes "
                        "class-conditional teachers")
    lw = mp.tensor(mp.expect(label, "Linear", f"{p}.map_label"), "weight", f"{p}.map_label")
    if mp.tensor(label, "bias", f"{p}.map_label", required=False) is not None:
        raise mp.fail(f"{p}.map_label", "has a bias")
    mp.sd["class_embedding.weight"] = lw.t().contiguous()

    # encoder: level l's blocks are down_blocks[l].resnets; level l+1's _down is down_blocks[l].downsamplers[0]
    conv_in = mp.conv("conv_in", down[0]["head"]["conv"][1], down[0]["head"]["conv"][0], kernel=3)
    block_out, down_types, up_types = [], [], []
    for level, lv in enumerate(down):
        key = f"down_blocks.{level}"
        attn = _map_level(mp, key, lv, f"{p}.enc")
        block_out.append(int(mp.sd[f"{key}.resnets.0.conv1.weight"].shape[0]))
        down_types.append("AttnDownBlock2D" if attn else "ResnetDownsampleBlock2D")
        if level > 0:
            _map_resample(mp, f"down_blocks.{level - 1}.downsamplers.0", *lv["head"]["down"], down=True)

    # middle: _in0 = resnet + attention, _in1 = resnet
    (p0, in0), (p1, in1) = up[0]["head"]["in0"], up[0]["head"]["in1"]
    if not _has_attention(in0) or _has_attention(in1):
        raise mp.fail(f"{p}.dec", "middle is not _in0 with attention then _in1 without")
    mp.resnet("mid_block.resnets.0", in0, p0)
    mp.attention("mid_block.attentions.0", in0, p0, kind="mid")
    mp.resnet("mid_block.resnets.1", in1, p1)

    # decoder: up_blocks[k] is level L-1-k; level l's _up is the upsampler at the end of the level below
    for k, lv in enumerate(up):
        attn = _map_level(mp, f"up_blocks.{k}", lv, f"{p}.dec")
        up_types.append("AttnUpBlock2D" if attn else "ResnetUpsampleBlock2D")
        if k > 0:
            _map_resample(mp, f"up_blocks.{k - 1}.upsamplers.0", *lv["head"]["up"], up=True)

    mp.norm("conv_norm_out", kids.get("out_norm"), f"{p}.out_norm")
    conv_out = mp.conv("conv_out", kids.get("out_conv"), f"{p}.out_conv", kernel=3)
    if int(nst.get("num_channels", -1)) != block_out[0] or w0.shape[1] != block_out[0]:
        raise mp.fail(f"{p}.map_noise", f"has {nst.get('num_channels')} channels, not the first level's "
                      f"{block_out[0]} (diffusers' time projection has as many)")
    config = {
        "sample_size": resolutions[0],
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(conv_out.shape[0]),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": int(w0.shape[0]),
        "freq_shift": 0,  # EDM's endpoint=False: frequencies (1/10000)^(i/half)
        "flip_sin_to_cos": True,  # EDM's cat([cos, sin])
        "down_block_types": down_types,
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": up_types,
        "block_out_channels": block_out,
        "layers_per_block": num_blocks,
        "mid_block_scale_factor": 1,
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "dropout": mp.one(mp.dropouts, "dropout"),
        "act_fn": "silu",
        "attention_head_dim": mp.one(mp.head_dims, "channels per attention head"),
        "norm_num_groups": mp.one(mp.groups["resnet"], "GroupNorm num_groups"),
        "attn_norm_num_groups": mp.one(mp.groups["mid"], "GroupNorm num_groups"),
        "norm_eps": mp.one(mp.eps, "GroupNorm eps"),
        "resnet_time_scale_shift": "scale_shift",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": int(lw.shape[1]),
    }
    return config, mp.sd


# --- the teacher folder ---------------------------------------------------------------------------


def _jsonable(x, depth: int = 0):
    if depth > 8:
        return "..."
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return f"tensor{list(x.shape)}"
    return f"<{_name(x)}>"


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; choose a new folder for the teacher")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new folder for the teacher")


def convert_edm(pkl: str | Path, out: str | Path, key: str = "ema") -> str:
    """Write the teacher folder OUT from the network ``pkl[key]``; returns a summary to print."""
    pkl, out = Path(pkl).expanduser(), Path(out).expanduser()
    if not pkl.is_file():
        raise UserError(f"{pkl}: no such file (expected an EDM network pickle, e.g. edm-imagenet-64x64-cond-adm.pkl)")
    _check_out(out)
    where = str(pkl)
    top = read_edm_pickle(pkl)
    if isinstance(top, dict):
        if key not in top:
            raise UserError(f"{where}: has no entry {key!r} (entries: {', '.join(map(str, top))}); pass --key")
        net = top[key]
    else:
        net = top
    if _name(net) != "EDMPrecond":
        inner = _name(_children(net).get("model")) if isinstance(net, Persistent) else None
        raise UserError(f"{where}: [{key!r}] is {_name(net)}{f'({inner})' if inner else ''}; "
                        f"dmd2 convert-edm supports {SUPPORTED}")
    model = _children(net).get("model")
    if _name(model) != "DhariwalUNet":
        raise UserError(f"{where}: the network is EDMPrecond({_name(model)}); dmd2 convert-edm supports {SUPPORTED}")
    pst = net.state
    try:
        sigma_data = float(pst["sigma_data"])
        raw_min, raw_max = float(pst.get("sigma_min", 0.0)), float(pst.get("sigma_max", math.inf))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: EDMPrecond has no numeric sigma_data / sigma_min / sigma_max") from None
    sigma_min, sigma_max = max(raw_min, SAMPLER_SIGMA_MIN), min(raw_max, SAMPLER_SIGMA_MAX)
    if not 0 < sigma_min < sigma_max or not sigma_data > 0:
        raise UserError(f"{where}: EDMPrecond's sigma range {raw_min}..{raw_max} (sigma_data {sigma_data}) is unusable")

    config, sd = map_dhariwal_unet(model, where)
    for name, value in (("label_dim", "num_class_embeds"), ("img_resolution", "sample_size"), ("img_channels", "in_channels")):
        if pst.get(name) is not None and int(pst[name]) != config[value]:
            raise UserError(f"{where}: EDMPrecond.{name} is {pst[name]} but the UNet's layers give {config[value]}")

    from diffusers import EDMEulerScheduler, UNet2DModel

    unet = UNet2DModel(**config)
    try:
        unet.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{where}: the layer shapes do not fit a UNet2DModel ({' '.join(s.strip() for s in first[:2])})") from None
    scheduler = EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=7.0,
                                  num_train_timesteps=1000, prediction_type="epsilon")
    notes = []
    if _children(model).get("map_augment") is not None:
        notes.append("map_augment dropped: EDM samples without augmentation labels")
    if (raw_min, raw_max) != (sigma_min, sigma_max):
        notes.append(f"sigma range {raw_min}..{raw_max} clamped to EDM's sampler range "
                     f"{SAMPLER_SIGMA_MIN}..{SAMPLER_SIGMA_MAX}")
    record = {
        "source": pkl.name,
        "sha256": sha256_file(pkl),
        "key": key,
        "network": f"EDMPrecond({_name(model)})",
        "module_src_sha256": model.module_src_sha256,
        "precond": {k: pst.get(k) for k in ("img_resolution", "img_channels", "label_dim", "use_fp16",
                                            "sigma_min", "sigma_max", "sigma_data")},
        "precond_init_kwargs": _kwargs(net),
        "model_init_kwargs": _kwargs(model),
        "scheduler": {"sigma_min": sigma_min, "sigma_max": sigma_max, "sigma_data": sigma_data, "rho": 7.0},
        "notes": notes,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "edm_source.json").write_text(json.dumps(_jsonable(record), indent=2) + "\n", encoding="utf-8")
        _check_out(out)  # still new: the folder appears whole or not at all
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    c = config
    attn = [str(c["sample_size"] >> i) for i, t in enumerate(c["down_block_types"]) if t.startswith("Attn")]
    params = sum(p.numel() for p in unet.parameters())
    return "\n".join([
        f"wrote {out}",
        f"  unet/: UNet2DModel from {record['network']}, {c['sample_size']}x{c['sample_size']}, "
        f"{c['in_channels']} -> {c['out_channels']} channels, block channels {c['block_out_channels']}, "
        f"{c['layers_per_block']} blocks per level, attention at {', '.join(attn + ['mid'])}, "
        f"{c['attention_head_dim']} channels per head, {c['num_class_embeds']} classes, {params / 1e6:.1f}M parameters",
        f"  scheduler/: EDMEulerScheduler, sigma {sigma_min:g}..{sigma_max:g}, sigma_data {sigma_data:g}"
        + (f" (the pickle's range: {raw_min:g}..{raw_max:g})" if (raw_min, raw_max) != (sigma_min, sigma_max) else ""),
        f"  edm_source.json: sha256 {record['sha256'][:16]}..., {pkl.name}[{key!r}]",
    ])
