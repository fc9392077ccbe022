"""digits-t2i: the checked-in SDXL-layout text-to-image teacher of the digits (dmd2.digits.t2i), its
prompts file and captioned real images. Seconds: no training beyond a two-step smoke run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dmd2.digits import t2i

REPO = Path(__file__).resolve().parent.parent
TEACHER = REPO / "recipes" / "data" / "digits_t2i_teacher"
PROMPTS = REPO / "recipes" / "data" / "digits_t2i_prompts.txt"


def test_checked_in_teacher_loads_as_sdxl():
    from dmd2.models import load_teacher
    from dmd2.models.conditioning import Conditioner

    teacher = load_teacher(str(TEACHER))
    assert teacher.family == "sdxl" and teacher.resolution == 16 and teacher.channels == 4
    assert teacher.vae_scale_factor == 2 and len(teacher.text_encoders) == 2
    assert teacher.unet.config.addition_embed_type == "text_time"
    assert teacher.schedule.kind == "ddpm" and teacher.schedule.prediction_type == "epsilon"
    sdxl = type(teacher.schedule).scaled_linear().alphas_cumprod
    assert torch.allclose(teacher.schedule.alphas_cumprod, sdxl)
    cond = Conditioner(teacher, teacher.resolution)
    c = cond.encode_prompts(["a handwritten digit 7", "the number seven"])
    assert c["encoder_hidden_states"].shape == (2, 77, 64) and c["text_embeds"].shape == (2, 32)
    assert c["time_ids"].tolist()[0] == [16, 16, 0, 0, 16, 16]


def test_plain_diffusers_pipeline_draws_offline():
    """No dmd2 code: StableDiffusionXLPipeline.from_pretrained on the folder, one step, with CFG."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(TEACHER))  # default dtypes: all fp32
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt and pipe.watermark is None
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)} == {torch.float32}
    out = pipe(["a handwritten digit 7", "the number three"], num_inference_steps=1, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


def test_pipeline_draws_the_prompted_digits():
    """20 steps with CFG 2 through the plain pipeline, two images per digit (two templates): the
    label classifier of the digits demo reads the prompted digit in most of them."""
    from diffusers import StableDiffusionXLPipeline

    from dmd2.digits.classifiers import predict_labels, train_label_classifier

    pipe = StableDiffusionXLPipeline.from_pretrained(str(TEACHER))
    pipe.set_progress_bar_config(disable=True)
    prompts = [t2i.caption(t, d) for t in (0, 1) for d in range(10)]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=2.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(i) for i in range(20)]).images
    digits = t2i.downscale(images * 2 - 1)
    accuracy = (predict_labels(train_label_classifier(t2i.load_split()["train"]), digits) == np.tile(np.arange(10), 2)).mean()
    assert accuracy >= 0.8, accuracy


def test_folder_is_small_and_records_its_settings():
    size = sum(f.stat().st_size for f in TEACHER.rglob("*") if f.is_file())
    assert size <= 8 * 2**20, f"{size / 2**20:.2f} MiB"
    record = json.loads((TEACHER / "digits_t2i_teacher.json").read_text())
    assert record["digest"] == t2i.T2ISettings().digest(), "the checked-in teacher was not made with the defaults"
    assert record["templates"] == list(t2i.TEMPLATES)


def test_prompts_file_and_tokenizers_hold_every_caption_word():
    from transformers import CLIPTokenizer

    prompts = PROMPTS.read_text().splitlines()
    assert "a handwritten digit 7" in prompts and prompts == t2i.all_prompts()
    assert len(prompts) == len(t2i.TEMPLATES) * 10
    for sub in ("tokenizer", "tokenizer_2"):
        tok = CLIPTokenizer.from_pretrained(str(TEACHER), subfolder=sub)
        for p in prompts:
            assert len(tok.tokenize(p)) == len(p.replace(",", " ,").split()), (sub, p, tok.tokenize(p))


def test_captioned_real_digits_are_read_by_the_trainer(tmp_path):
    from dmd2.data import RealImages

    root = t2i.write_captioned_digits(tmp_path / "real")
    lines = [json.loads(x) for x in (root / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 1437 and lines[0]["file_name"] == "00000.png"
    assert {x["text"] for x in lines} <= set(t2i.all_prompts())
    real = RealImages(root, 16, labelled=False)
    x, items = real.load([0, 1436])
    assert x.shape == (2, 3, 16, 16) and items[0].caption == lines[0]["text"]
    # pooling 2 x 2 gives the 8 x 8 digit back exactly
    images, _ = t2i.load_split()["train"]
    assert np.array_equal(t2i.downscale(x)[..., 0], images[[0, 1436]])
    before = (root / "captions.jsonl").stat().st_mtime_ns
    assert t2i.write_captioned_digits(tmp_path / "real") == root
    assert (root / "captions.jsonl").stat().st_mtime_ns == before  # kept when unchanged


def test_training_smoke_is_deterministic_and_loadable(tmp_path):
    """Two steps of each stage through the real training code, twice: the same weights."""
    from dmd2.models import load_teacher

    s = t2i.T2ISettings(vae=replace(t2i.VAESettings(), steps=2, batch_size=8),
                        unet=replace(t2i.UNetSettings(), steps=2, batch_size=8, caption_dropout=0.5))
    torch.set_num_threads(1)
    a, b = t2i.train_t2i(tmp_path / "a", s), t2i.train_t2i(tmp_path / "b", s)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (fa,), (fb,) = (a / part).glob("*.safetensors"), (b / part).glob("*.safetensors")
        assert fa.read_bytes() == fb.read_bytes(), part
    teacher = load_teacher(str(a))
    assert teacher.family == "sdxl" and teacher.resolution == 16
    assert json.loads((a / "digits_t2i_teacher.json").read_text())["digest"] == s.digest()
