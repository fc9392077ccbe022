"""Tiny random teachers (dmd2.tiny) and the checked-in tiny data folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd2.tiny import FAMILIES, make_tiny_teacher

PIPELINE_FAMILIES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
TRANSFORMER_FAMILIES = {"sd3": "StableDiffusion3Pipeline",  # tests/test_sd3.py
                        "flux": "FluxPipeline", "flux-schnell": "FluxPipeline"}  # tests/test_flux.py
CLASSCOND_FAMILIES = {
    "classcond": ("DDPMScheduler", "epsilon"),
    "classcond-v": ("DDPMScheduler", "v_prediction"),
    "classcond-edm": ("EDMEulerScheduler", "epsilon"),
}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_families_cover_pipelines_and_classcond():
    assert set(FAMILIES) == set(PIPELINE_FAMILIES) | set(TRANSFORMER_FAMILIES) | set(CLASSCOND_FAMILIES)


@pytest.mark.parametrize("family", sorted(PIPELINE_FAMILIES))
def test_pipeline_teacher_loads_and_generates(family, tiny_teacher):
    from diffusers import DiffusionPipeline

    path = tiny_teacher(family)
    assert _size(path) < 10 * 2**20
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == PIPELINE_FAMILIES[family]
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 4
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    assert pipe.tokenizer.model_max_length == 77
    if family == "sdxl":
        assert pipe.unet.config.cross_attention_dim == 64
        assert len(pipe.tokenizer_2) == pipe.text_encoder_2.config.vocab_size
        assert pipe.text_encoder_2.config.projection_dim == 32
    else:
        assert pipe.unet.config.cross_attention_dim == 32
    images = pipe(
        "a red circle on a blue background",
        num_inference_steps=1,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("family", sorted(CLASSCOND_FAMILIES))
def test_classcond_teacher_loads_and_runs(family, tiny_teacher):
    import diffusers
    from diffusers import UNet2DModel

    path = tiny_teacher(family)
    assert sorted(p.name for p in path.iterdir()) == ["scheduler", "unet"]
    assert _size(path) < 10 * 2**20
    scheduler_name, prediction_type = CLASSCOND_FAMILIES[family]
    scheduler = getattr(diffusers, scheduler_name).from_pretrained(path, subfolder="scheduler")
    assert scheduler.config.prediction_type == prediction_type
    assert scheduler.config.num_train_timesteps == 1000
    unet = UNet2DModel.from_pretrained(path, subfolder="unet")
    assert unet.config.sample_size == 16 and unet.config.num_class_embeds == 10
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 500]), class_labels=torch.tensor([3, 7])).sample
        other = unet(x, torch.tensor([10, 500]), class_labels=torch.tensor([4, 8])).sample
    assert out.shape == (2, 3, 16, 16)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, other)  # the class label matters


@pytest.mark.parametrize("family", ["sd15", "sd3", "classcond"])
def test_same_seed_same_weights(family, tiny_teacher, tmp_path):
    ref = _weights(tiny_teacher(family))
    again = _weights(make_tiny_teacher(family, tmp_path / "again", seed=0))
    assert ref.keys() == again.keys() and len(ref) > 0
    assert all(torch.equal(ref[k], again[k]) for k in ref)
    other = _weights(make_tiny_teacher(family, tmp_path / "other", seed=1))
    assert any(not torch.equal(ref[k], other[k]) for k in ref)


def test_does_not_touch_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_teacher("classcond", tmp_path / "t")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny teacher family"):
        make_tiny_teacher("sd2", tmp_path)


@pytest.mark.parametrize("subfolder", ["tokenizer", "tokenizer_2"])
def test_tokenizer_distinguishes_prompts(subfolder, tiny_teacher):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_teacher("sdxl"), subfolder=subfolder)
    assert 900 <= len(tok) <= 1100
    assert tok.convert_ids_to_tokens([len(tok) - 2, len(tok) - 1]) == ["<|startoftext|>", "<|endoftext|>"]

    def ids(prompt):
        return tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids

    a, b = ids("a red circle on a blue background"), ids("an astronaut riding a horse")
    assert len(a) == len(b) == 77
    assert a != b
    assert a[0] == tok.bos_token_id and tok.eos_token_id in a
    words = tok("a photo of a cat riding green horizontal stripes").input_ids[1:-1]
    assert len(set(words)) >= 7  # words are not collapsed into one id
    assert tok.unk_token_id not in words
    assert tok("xylophone zebra").input_ids != tok("quartz jukebox").input_ids  # unseen words: byte pieces


def test_tiny_images_folder(repo_root):
    from PIL import Image

    folder = repo_root / "recipes" / "data" / "tiny_images"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == [f"img_{i:03d}.png" for i in range(12)]
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines() if line.strip()]
    assert [r["file_name"] for r in rows] == pngs
    assert all(isinstance(r["text"], str) and r["text"] for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)
    for name in pngs:
        with Image.open(folder / name) as im:
            assert im.mode == "RGB" and im.size == (32, 32)


def test_tiny_classes_folder(repo_root):
    from PIL import Image

    folder = repo_root / "recipes" / "data" / "tiny_classes"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [str(k) for k in range(10)]
    for k in range(10):
        pngs = sorted((folder / str(k)).glob("*.png"))
        assert len(pngs) == 2
        for p in pngs:
            with Image.open(p) as im:
                assert im.mode == "RGB" and im.size == (16, 16)


def test_data_script_reproduces_checked_in_files(repo_root, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_tiny_data", repo_root / "scripts" / "make_tiny_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    checked_in = repo_root / "recipes" / "data"
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(made) == 12 + 1 + 20
    for rel in made:
        if rel.suffix == ".png":  # compare pixels: PNG bytes may vary with the zlib build
            from PIL import Image

            with Image.open(checked_in / rel) as a, Image.open(tmp_path / rel) as b:
                assert np.array_equal(np.asarray(a), np.asarray(b)), rel
        else:
            assert (checked_in / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
