"""dmd2 convert-edm: an EDM network pickle (EDMPrecond around DhariwalUNet) to a teacher folder.

No EDM code is vendored: a small DhariwalUNet is rebuilt here from the architecture's description,
with random weights everywhere (EDM zero-initialises some), and pickled the way EDM's
``torch_utils.persistence`` does (each network object reduces to
``_reconstruct_persistent_obj(meta)`` carrying its module source and ``__dict__``). The throwaway
``torch_utils`` / ``dnnlib`` modules exist only while pickling, so the converter provably reads the
file without them and without running the embedded source.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dmd2.cli import app
from dmd2.errors import UserError

MODULE_SRC = "raise SystemExit('EDM networks.py stand-in: must never run')\n"
FAKE_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")


def _fake_modules() -> dict:
    pers = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only ever pickled here")

    _reconstruct_persistent_obj.__module__ = pers.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util", "__qualname__": "EasyDict"})
    tu, dnnlib = types.ModuleType("torch_utils"), types.ModuleType("dnnlib")
    tu.persistence, dnnlib.util = pers, util
    return {"torch_utils": tu, "torch_utils.persistence": pers, "dnnlib": dnnlib, "dnnlib.util": util}


class Persistent(torch.nn.Module):
    """Pickles as EDM's persistent classes do: the reconstruct function, the source and __dict__."""

    def __init__(self, **kwargs):
        super().__init__()
        self._init_args, self._init_kwargs = (), kwargs

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=MODULE_SRC, class_name=type(self).__name__,
                    state=dict(self.__dict__))
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


# --- EDM's layers, from the description ------------------------------------------------------------

INIT = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))  # numpy scalars, as EDM


def _rand(*shape, fan_in=1):
    return torch.nn.Parameter(torch.randn(*shape) / fan_in**0.5)


class Linear(Persistent):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features=in_features, out_features=out_features, bias=bias, **INIT)
        self.in_features, self.out_features = in_features, out_features
        self.weight = _rand(out_features, in_features, fan_in=in_features)
        self.bias = _rand(out_features) if bias else None

    def forward(self, x):
        x = x @ self.weight.t()
        return x + self.bias if self.bias is not None else x


class Conv2d(Persistent):
    def __init__(self, in_channels, out_channels, kernel, up=False, down=False):
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down, **INIT)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, False
        self.weight = _rand(out_channels, in_channels, kernel, kernel, fan_in=in_channels * kernel**2) if kernel else None
        self.bias = _rand(out_channels) if kernel else None
        f = torch.tensor([1.0, 1.0])
        self.register_buffer("resample_filter", (f.ger(f) / f.sum() ** 2)[None, None] if up or down else None)

    def forward(self, x):
        c, f = x.shape[1], self.resample_filter
        if self.up:
            x = F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2)
        if self.down:
            x = F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2)
        return x + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else x


class GroupNorm(Persistent):
    def __init__(self, num_channels, eps=1e-5):
        super().__init__(num_channels=num_channels)
        self.num_groups, self.eps = min(32, num_channels // 4), eps
        self.weight = torch.nn.Parameter(1 + 0.3 * torch.randn(num_channels))
        self.bias = torch.nn.Parameter(0.3 * torch.randn(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class UNetBlock(Persistent):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False):
        super().__init__(in_channels=in_channels, out_channels=out_channels, emb_channels=emb_channels)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = out_channels // 64 if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = 0.1, 1, True
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down)
        self.affine = Linear(emb_channels, 2 * out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1 if out_channels != in_channels else 0, up=up, down=down)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        x = F.silu(self.norm1(x) * (scale + 1) + shift)
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            n, c = x.shape[:2]
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            w = torch.einsum("ncq,nck->nqk", q, k / (c // self.num_heads) ** 0.5).softmax(dim=2)
            a = torch.einsum("nqk,nck->ncq", w, v)
            x = (self.proj(a.reshape(*x.shape)) + x) * self.skip_scale
        return x


class PositionalEmbedding(Persistent):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__(num_channels=num_channels)
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        freqs = torch.arange(self.num_channels // 2, dtype=torch.float32) / (self.num_channels // 2)
        x = x.ger((1 / self.max_positions) ** freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class DhariwalUNet(Persistent):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim, model_channels=128,
                 channel_mult=(1, 2), num_blocks=2, attn_resolutions=(8,)):
        super().__init__(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                         label_dim=label_dim, model_channels=model_channels, channel_mult=list(channel_mult),
                         num_blocks=num_blocks, attn_resolutions=list(attn_resolutions))
        self.label_dropout = 0
        emb = model_channels * 4
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = None
        self.map_layer0 = Linear(model_channels, emb)
        self.map_layer1 = Linear(emb, emb)
        self.map_label = Linear(label_dim, emb, bias=False)
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, emb, down=True)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb, attention=res in attn_resolutions)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, emb, attention=True)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, emb)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, emb, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb, attention=res in attn_resolutions)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_labels):
        emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(noise_labels))))
        emb = F.silu(emb + self.map_label(class_labels))
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class EDMPrecond(Persistent):
    def __init__(self, model, img_resolution, img_channels, label_dim):
        super().__init__(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = False, 0, float("inf"), 0.5
        self.model = model

    def forward(self, x, sigma, class_labels):
        sigma = sigma.reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log() / 4
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), class_labels)


class EDMLoss(Persistent):
    def __init__(self):
        super().__init__(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


class SongUNet(Persistent):
    pass


def _pickle(path, net) -> None:
    """Write ``{'ema': net, ...}`` as EDM's training loop does, with the fake modules present only meanwhile."""
    fakes = _fake_modules()
    sys.modules.update(fakes)
    try:
        data = dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None,
                    dataset_kwargs=fakes["dnnlib.util"].EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                                 resolution=16, use_labels=True))
        with open(path, "wb") as f:
            pickle.dump(data, f)
    finally:
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)


LABELS = 5
RES = 16


@pytest.fixture(scope="module")
def edm(tmp_path_factory):
    torch.manual_seed(0)
    net = EDMPrecond(DhariwalUNet(RES, 3, 3, LABELS), RES, 3, LABELS).eval()
    path = tmp_path_factory.mktemp("edm") / "edm-tiny-16x16-cond-adm.pkl"
    _pickle(path, net)
    return net, path


def test_converted_teacher_reproduces_the_edm_network(edm, tmp_path):
    net, pkl = edm
    assert MODULE_SRC.encode() in pkl.read_bytes() and not any(m in sys.modules for m in FAKE_MODULES)
    out = tmp_path / "teacher"
    res = CliRunner().invoke(app, ["convert-edm", str(pkl), str(out)])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert "UNet2DModel from EDMPrecond(DhariwalUNet)" in res.stdout and "sigma 0.002..80" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["edm_source.json", "scheduler", "unet"]
    assert not [p for p in tmp_path.iterdir() if p.name != "teacher"]  # no partial folder left behind
    src = json.loads((out / "edm_source.json").read_text())
    assert src["network"] == "EDMPrecond(DhariwalUNet)" and len(src["sha256"]) == 64
    assert src["model_init_kwargs"]["channel_mult"] == [1, 2] and src["precond"]["sigma_max"] == "inf"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EDMEulerScheduler" and (sched["sigma_min"], sched["sigma_max"]) == (0.002, 80.0)
    assert sched["sigma_data"] == 0.5 and sched["prediction_type"] == "epsilon"

    from dmd2.models import load_teacher
    from dmd2.models.denoiser import Denoiser

    teacher = load_teacher(str(out), "classcond")
    assert teacher.num_classes == LABELS and teacher.resolution == RES and teacher.schedule.kind == "edm"
    den = Denoiser(teacher.unet, teacher.schedule)
    labels = torch.tensor([0, 3, 4, 1])
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, RES, RES, generator=g).clamp(-1, 1)
    with torch.no_grad():
        for target in (0.01, 1.0, 80.0):
            t = (teacher.schedule.sigmas - target).abs().argmin().repeat(4)
            sigma = teacher.schedule.sigmas[t].float()
            x_t = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
            want = net(x_t, sigma, F.one_hot(labels, LABELS).float())
            got = den(x_t, t, {"class_labels": labels})
            scale = want.abs().max().item()
            assert scale > 0.1 and (want[0] - want[1]).abs().max() > 1e-2 * scale  # labels matter
            torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-4)


def test_existing_out_is_refused_by_the_cli(edm, tmp_path):
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = CliRunner().invoke(app, ["convert-edm", str(edm[1]), str(out)])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not empty" in lines[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_other_edm_architectures_are_refused(tmp_path):
    from dmd2.convert_edm import convert_edm

    pkl = tmp_path / "edm-cifar10-32x32-cond-vp.pkl"
    _pickle(pkl, EDMPrecond(SongUNet(), 32, 3, 10))
    with pytest.raises(UserError) as e:
        convert_edm(pkl, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and "SongUNet" in msg and "DhariwalUNet" in msg
    assert not (tmp_path / "out").exists()


def test_a_pickle_naming_other_globals_is_refused_without_running_it(tmp_path):
    from dmd2.convert_edm import convert_edm

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"ema": Evil()}))
    with pytest.raises(UserError) as e:
        convert_edm(pkl, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and "refused" in msg and "system" in msg
    assert not marker.exists() and not (tmp_path / "out").exists()
