"""`dmd2 sample`, `dmd2 eval` and `dmd2 export` on tiny runs trained through the real CLI.

Tolerances: the exported pipeline run by plain diffusers (LCMScheduler) matches `dmd2 sample`
to 1e-5 on images in [-1, 1] (measured ~1.2e-6: diffusers converts eps -> x0 in float32, dmd2 in
float64); a batch of 1 and a batch of 5 differ by ~1.5e-6 (oneDNN's batch-dependent kernels),
which leaves the PNGs identical in practice (asserted: off by at most 1 of 255).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_env, cli_error, free_port
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TINY_IMAGES = REPO / "recipes" / "data" / "tiny_images"
PROMPTS = ["a red circle", "a cat riding a horse", "blue stripes"]
IMAGE_TOL = 1e-5


def run_cli(*args, ranks=1, timeout=600):
    env = cli_env()  # a fresh process group: drop what an in-process engine test left in os.environ
    if ranks == 1:
        cmd = [sys.executable, "-m", "dmd2", *map(str, args)]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "--module", "dmd2", *map(str, args)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def _train(tmp_path_factory, teacher, recipe, name, *overrides) -> Path:
    run = tmp_path_factory.mktemp("runs") / name
    run_cli("train", recipe, f"model.teacher={teacher}", "train.max_steps=2", "train.checkpoint_every=2",
            f"output_dir={run}", *overrides)
    return run


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory, tiny_teacher):
    """2-step generator (timesteps [999, 499]), so the export's scheduler re-noises once."""
    return _train(tmp_path_factory, tiny_teacher("sd15"), "recipes/tiny_sd15.yaml", "sd15",
                  "generator.num_steps=2", "optim.generator.lr=1e-3")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_teacher):
    """A LoRA run whose one generator step moves the adapter visibly (lr 1e-2)."""
    return _train(tmp_path_factory, tiny_teacher("sd15"), "recipes/tiny_sd15.yaml", "lora",
                  "model.lora.enabled=true", "model.lora.rank=4", "optim.generator.lr=1e-2")


@pytest.fixture(scope="module")
def classcond_run(tmp_path_factory, tiny_teacher):
    return _train(tmp_path_factory, tiny_teacher("classcond"), "recipes/tiny_classcond.yaml", "classcond")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random transformers CLIPModel + processor (the tiny CLIP tokenizer), saved to disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dmd2.tiny import make_tiny_clip_tokenizer

    tok = make_tiny_clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    out = tmp_path_factory.mktemp("clip")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _images(gen, conds, seeds, batch_size, timesteps=None):
    from dmd2.generate import draw

    ts = timesteps or gen.timesteps
    return torch.cat([x for _, x in draw(gen, conds, seeds, ts, range(len(conds)), batch_size)]).clamp(-1, 1)


def _png(folder: Path, i: int) -> np.ndarray:
    return np.array(Image.open(folder / f"{i:06d}.png")).astype(int)


def _tile(grid: np.ndarray, r: int, c: int, size: int, pad: int = 2) -> np.ndarray:
    """The image at row r, column c of a sample grid.png (``pad`` px around every image)."""
    top, left = pad + r * (size + pad), pad + c * (size + pad)
    return grid[top:top + size, left:left + size]


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------------------------------------
# sample


def test_sample_cli_and_per_sample_seeds(sd15_run, tmp_path):
    """PNGs + grid + images.jsonl; image i depends on seed + i only, not on the batch size."""
    from dmd2.generate import sample_to_folder
    from dmd2.models.student import load_student

    out = tmp_path / "cli"
    res = run_cli("sample", sd15_run, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images", 5,
                  "--batch-size", 2, "--seed", 7, "--out", out)
    assert "sample" in res.stderr and "5/5" in res.stderr  # the progress bar
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["grid.png", "images.jsonl"]
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["prompt"]) for r in rows] == [(7 + i, PROMPTS[i % 2]) for i in range(5)]
    assert rows[0]["timesteps"] == [999, 499]
    grid = np.array(Image.open(out / "grid.png"))
    assert grid.shape[:2] == (2 * 34 + 2, 3 * 34 + 2)  # one prompt per row (image i in row i mod 2), 2 px gaps
    for i in range(5):
        assert np.array_equal(_tile(grid, i % 2, i // 2, 32), _png(out, i).astype(np.uint8))

    one = sample_to_folder(sd15_run, tmp_path / "b5", prompts=PROMPTS[:2], num_images=5, batch_size=5, seed=7)
    for i in range(5):
        assert np.abs(_png(out, i) - _png(one, i)).max() <= 1
    gen = load_student(sd15_run)
    conds = [PROMPTS[i % 2] for i in range(5)]
    x1, x5 = _images(gen, conds, range(7, 12), 1), _images(gen, conds, range(7, 12), 5)
    assert (x1 - x5).abs().max() < IMAGE_TOL
    # image 3 alone, seed 10, is image 3 of the batch
    assert (_images(gen, conds[3:4], [10], 1) - x1[3:4]).abs().max() < IMAGE_TOL
    # --steps 1 samples the first trained timestep only: a different image
    assert (_images(gen, conds[:1], [7], 1, [999]) - x1[:1]).abs().max() > 1e-3


def test_sample_refuses_a_folder_with_images_unless_overwrite(sd15_run, tmp_path):
    from typer.testing import CliRunner

    from dmd2.cli import app
    from dmd2.generate import sample_to_folder

    out = sample_to_folder(sd15_run, tmp_path / "s", prompts=PROMPTS, num_images=3)
    (out / "extra.webp").write_bytes(b"an image from elsewhere")
    (out / "notes.txt").write_text("not an image")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    msg = cli_error("sample", sd15_run, "--out", out, "--prompt", "new", "--num-images", 1)
    assert str(out) in msg and "already holds 5 images" in msg and "--overwrite" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost

    res = CliRunner().invoke(app, [str(a) for a in ("sample", sd15_run, "--out", out, "--prompt", "new",
                                                    "--num-images", 1, "--overwrite")])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "grid.png", "images.jsonl", "notes.txt"]
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["new"]
    assert Image.open(out / "grid.png").size == (32, 32)  # the grid of the one new image


@pytest.mark.slow
def test_sample_two_ranks_draw_the_same_images(sd15_run, tmp_path):
    run_cli("sample", sd15_run, "--prompt", PROMPTS[0], "--num-images", 5, "--batch-size", 2, "--out", tmp_path / "a")
    run_cli("sample", sd15_run, "--prompt", PROMPTS[0], "--num-images", 5, "--batch-size", 2, "--out", tmp_path / "b",
            ranks=2)
    for i in range(5):
        assert np.abs(_png(tmp_path / "a", i) - _png(tmp_path / "b", i)).max() <= 1
    assert (tmp_path / "b" / "grid.png").is_file()


def test_choose_timesteps():
    from dmd2.errors import UserError
    from dmd2.generate import choose_timesteps

    trained = [999, 749, 499, 249]
    assert choose_timesteps(trained) == trained
    assert choose_timesteps(trained, 2) == [999, 499]
    assert choose_timesteps(trained, 1) == [999]
    assert choose_timesteps(trained, 3) == [999, 749, 249]
    assert choose_timesteps(trained, timesteps=[999, 500]) == [999, 500]
    for bad in ([500, 999], [1000], []):
        with pytest.raises(UserError, match="strictly descending"):
            choose_timesteps(trained, timesteps=bad)
    with pytest.raises(UserError, match="trained for 4 step"):
        choose_timesteps(trained, 5)


# ---------------------------------------------------------------------------------------------
# export


def test_export_pipeline_runs_in_plain_diffusers_and_matches_sample(sd15_run, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler
    from safetensors import safe_open

    from dmd2.models.student import load_student

    out = tmp_path / "pipe"
    run_cli("export", sd15_run, "--pipeline", "--out", out)
    meta = json.loads((out / "dmd2.json").read_text())
    assert (meta["step"], meta["timesteps"], meta["family"], meta["format"]) == (2, [999, 499], "sd15", "diffusers")
    assert meta["recipe"]["generator"]["num_steps"] == 2 and meta["schedule"]["kind"] == "ddpm"
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        stamped = json.loads(f.metadata()["dmd2"])
    assert stamped["timesteps"] == [999, 499] and stamped["step"] == 2 and "recipe" in stamped

    pipe = DiffusionPipeline.from_pretrained(out)  # plain diffusers, no dmd2 code
    assert isinstance(pipe.scheduler, LCMScheduler)
    seeds = [3, 4, 5]
    ref = _images(load_student(sd15_run), PROMPTS, seeds, 3)
    for kw in ({"timesteps": [999, 499]}, {}):  # original_inference_steps=2 gives [999, 499] by itself
        got = pipe(PROMPTS, num_inference_steps=2, guidance_scale=0, generator=_gens(seeds), output_type="pt", **kw)
        assert (got.images * 2 - 1 - ref).abs().max() < IMAGE_TOL
    # dmd2 reads the export too, and draws the same images
    assert (_images(load_student(out), PROMPTS, seeds, 3) - ref).abs().max() < IMAGE_TOL


def test_export_unet_fp16(sd15_run, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from dmd2.export import export
    from dmd2.models.student import load_student

    out = tmp_path / "unet16"
    export(sd15_run, out, dtype="fp16")
    assert sorted(p.name for p in out.iterdir()) == ["dmd2.json", "unet"]
    weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float16}
    UNet2DConditionModel.from_pretrained(out / "unet")  # loads in plain diffusers
    gen = load_student(out)  # the rest comes from the run's teacher; sampled in fp32
    ref = _images(load_student(sd15_run), PROMPTS[:1], [0], 1)
    assert 0 < (_images(gen, PROMPTS[:1], [0], 1) - ref).abs().max() < 1e-2


def test_lora_export_loads_in_diffusers_and_changes_its_output(lora_run, tiny_teacher, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from dmd2.errors import UserError
    from dmd2.export import distilled_scheduler, export
    from dmd2.models.student import load_student

    export(lora_run, tmp_path / "lora", fmt="lora")
    export(lora_run, tmp_path / "kohya", fmt="lora", lora_style="kohya")
    export(lora_run, tmp_path / "merged", merge_lora=True)
    diff_keys = list(load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")))
    kohya_keys = list(load_file(str(tmp_path / "kohya" / "dmd2_lora_kohya.safetensors")))
    assert all(k.startswith("unet.") and ".lora_" in k for k in diff_keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya_keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in kohya_keys

    seeds = [1, 2, 3]
    ref = _images(load_student(lora_run), PROMPTS, seeds, 3)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher("sd15"))
    pipe.scheduler = distilled_scheduler(pipe.scheduler.config, [999])

    def run():
        return pipe(PROMPTS, timesteps=[999], guidance_scale=0, generator=_gens(seeds), output_type="pt").images * 2 - 1

    base = run()
    assert (base - ref).abs().max() > 0.05  # the teacher alone is not the generator
    for folder in ("lora", "kohya"):
        pipe.load_lora_weights(tmp_path / folder)
        assert (run() - ref).abs().max() < IMAGE_TOL
        pipe.unload_lora_weights()
    # dmd2 reads all three exports back as the same generator
    for folder in ("lora", "kohya", "merged"):
        assert (_images(load_student(tmp_path / folder), PROMPTS, seeds, 3) - ref).abs().max() < IMAGE_TOL
    with pytest.raises(UserError, match="is a LoRA run: --format lora writes the adapter, --merge-lora"):
        export(lora_run, tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# eval


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # clean-fid's own call to scipy
def test_fid_of_a_folder_against_itself_and_a_perturbed_copy(tmp_path, extractor_file):
    from cleanfid import fid as cleanfid

    from dmd2.evaluate import (
        Protocol,
        folder_features,
        frechet_distance,
        image_features,
        load_feature_extractor,
        reference_stats,
        stats,
    )
    from dmd2.generate import load_images

    ref = tmp_path / "ref"
    ref.mkdir()
    files = sorted(TINY_IMAGES.glob("*.png"))
    for i, f in enumerate(files):
        Image.open(f).convert("RGB").save(ref / f"{i:06d}.png")
    rng = np.random.default_rng(0)
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for i in range(len(files)):
        arr = _png(ref, i) * 0.7 + rng.normal(0, 20, (32, 32, 3))  # darker and noisy
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(noisy / f"{i:06d}.png")

    ext = load_feature_extractor(extractor_file)
    images = load_images(ref, range(len(files)))
    feats = image_features(images, ext)
    assert feats.shape == (len(files), 6)
    assert np.allclose(feats, folder_features(ref, ext), atol=1e-5)  # tensor path == clean-fid's folder reader
    mu, sigma = reference_stats(ref, ext, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert abs(frechet_distance(*stats(feats), mu, sigma)) < 1e-8  # measured 1e-12
    far = frechet_distance(*stats(folder_features(noisy, ext)), mu, sigma)
    assert far > 0.02  # measured 0.084 (the tiny extractor's features are small: 6 projections of 2x2 means)
    # the same number through clean-fid's own entry point
    direct = cleanfid.compute_fid(str(noisy), str(ref), mode="clean", custom_feat_extractor=ext,
                                  device=torch.device("cpu"), num_workers=0, verbose=False)
    assert direct == pytest.approx(far, rel=1e-4)
    # cached statistics are reused, and keyed by the protocol
    assert np.array_equal(reference_stats(ref, ext, cache_dir=tmp_path / "cache")[0], mu)
    reference_stats(ref, ext, Protocol(eval_res=16), cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    # protocols: centre crop + resize, and 299 patches (the whole image when smaller)
    img = np.zeros((40, 60, 3), np.uint8)
    assert Protocol(eval_res=16).transform(img).shape == (16, 16, 3)
    assert Protocol(patch=True).transform(img).shape == (40, 40, 3)
    assert Protocol().transform(img) is img


def test_clip_score_is_deterministic_and_in_range(clip_folder):
    from dmd2.evaluate import clip_scores, load_clip

    images = torch.from_numpy(np.stack([np.array(Image.open(f).convert("RGB"))
                                        for f in sorted(TINY_IMAGES.glob("*.png"))[:4]]))
    prompts = ["a red circle", "a blue square", "a cat", "green stripes"]
    model, processor = load_clip(str(clip_folder))
    a = clip_scores(images, prompts, model, processor)
    b = clip_scores(images, prompts, *load_clip(str(clip_folder)), batch_size=3)
    assert a.shape == (4,) and torch.allclose(a, b, atol=1e-6)
    assert bool(((a >= -1) & (a <= 1)).all())
    assert not torch.allclose(a, clip_scores(images, prompts[::-1], model, processor))


def test_eval_cli_scores_student_and_teacher(sd15_run, tmp_path, extractor_file, clip_folder):
    out = tmp_path / "report.json"
    res = run_cli("eval", sd15_run, "--fid", "--clip", "--patch-fid", "--eval-res", 24, "--ref-dir", TINY_IMAGES,
                  "--feature-extractor", extractor_file, "--clip-model", clip_folder, "--stats-cache", tmp_path / "c",
                  "--prompts-file", REPO / "recipes" / "data" / "tiny_prompts.txt", "--num-images", 4,
                  "--teacher", "--teacher-steps", 2, "--out", out)
    report = json.loads(out.read_text())
    names = [m["name"] for m in report["metrics"]]
    assert names == ["fid", "patch_fid", "clip_score", "teacher/fid", "teacher/patch_fid", "teacher/clip_score"]
    assert all(np.isfinite(m["value"]) for m in report["metrics"])
    assert all(-1 <= m["value"] <= 1 for m in report["metrics"] if "clip" in m["name"])
    assert (report["n"], report["step"], report["protocol"]["timesteps"]) == (4, 2, [999, 499])
    assert report["protocol"]["fid"]["eval_res"] == 24 and report["seconds"] > 0
    assert report["teacher"] == {"source": report["teacher"]["source"], "steps": 2, "sampler": "PNDMScheduler",
                                 "cfg_scale": 1.75, "images_per_s": report["teacher"]["images_per_s"]}
    # each sampler's speed, timed on its draw alone (the images' saving is not in it)
    assert all(0 < x < float("inf") for x in (report["images_per_s"], report["teacher"]["images_per_s"]))
    assert report["threads"] >= 1
    assert sorted(p.name for p in (tmp_path / "report_images").iterdir()) == ["student", "teacher_2steps"]
    assert "fid: " in res.stdout and "teacher/clip_score: " in res.stdout
    # --draw-only: the same images, kept for the caller's own metrics, and nothing scored
    drawn = tmp_path / "drawn"
    res = run_cli("eval", sd15_run, "--draw-only", "--prompts-file", REPO / "recipes" / "data" / "tiny_prompts.txt",
                  "--num-images", 4, "--teacher", "--teacher-steps", 2, "--images-dir", drawn,
                  "--out", tmp_path / "drawn.json")
    assert json.loads((tmp_path / "drawn.json").read_text())["metrics"] == []
    assert f"images: {drawn}" in res.stdout
    for sub in ("student", "teacher_2steps"):
        files = sorted(p.name for p in (drawn / sub).iterdir())
        assert len(files) == 4 and all((drawn / sub / f).read_bytes() == (tmp_path / "report_images" / sub / f)
                                       .read_bytes() for f in files)
    # --teacher-only: the same teacher rows (same seeds), no generator drawn, its old images removed
    run_cli("eval", sd15_run, "--fid", "--eval-res", 24, "--ref-dir", TINY_IMAGES, "--feature-extractor", extractor_file,
            "--stats-cache", tmp_path / "c", "--prompts-file", REPO / "recipes" / "data" / "tiny_prompts.txt",
            "--num-images", 4, "--teacher-only", "--teacher-steps", 2, "--out", out)
    alone = json.loads(out.read_text())
    assert [m["name"] for m in alone["metrics"]] == ["teacher/fid"]
    assert alone["metrics"][0]["value"] == pytest.approx(report["metrics"][3]["value"], rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "report_images").iterdir()) == ["teacher_2steps"]


def test_classcond_labels_teacher_and_export(classcond_run, tmp_path):
    from dmd2.errors import UserError
    from dmd2.evaluate import evaluate
    from dmd2.export import export
    from dmd2.generate import conditions, generate_images, teacher_draw, teacher_images
    from dmd2.logs import to_uint8_images
    from dmd2.models import Conditioner, Denoiser
    from dmd2.models.student import load_student, teacher_of
    from dmd2.sampling import Noise, sample

    gen = load_student(classcond_run)
    assert conditions(gen, labels=[3], num_images=2) == [3, 3]
    assert conditions(gen, num_images=12) == list(range(10)) + [0, 1]
    with pytest.raises(UserError, match="out of range; the model has 10 classes"):
        conditions(gen, labels=[10])
    with pytest.raises(UserError, match="class-conditional"):
        conditions(gen, prompts=["a cat"])
    x = _images(gen, [0, 1], [0, 1], 2)
    assert x.shape == (2, 3, 16, 16)

    # the teacher's own sampler: one network call per step; 1 step of DDIM is the x0 prediction at 999
    teacher = teacher_of(gen.recipe, "test")
    cond = Conditioner(teacher, 16).encode_labels(torch.tensor([0, 1]))
    den = Denoiser(teacher.unet, teacher.schedule)
    calls = []
    one = sample(lambda *a: calls.append(1) or den(*a), teacher.schedule, cond, (2, 3, 16, 16), [999],
                 Noise.per_sample([0, 1]), deterministic=True)
    assert len(calls) == 1
    x0 = den(Noise.per_sample([0, 1])((2, 3, 16, 16)), torch.full((2,), 999), cond)
    assert torch.allclose(one, x0)
    drawn = torch.cat([im for _, im in teacher_draw(teacher, [0, 1], [0, 1], 4, [0, 1], 2, cfg_scale=1.0,
                                                     resolution=16, device="cpu")])
    assert drawn.shape == (2, 3, 16, 16) and torch.isfinite(drawn).all()
    assert torch.equal(teacher_images(teacher, [0, 1], 4, batch_size=2), to_uint8_images(drawn))
    assert torch.equal(generate_images(gen, [0, 1], batch_size=2), to_uint8_images(x))

    # scripts plug their own metrics of uint8 images into eval, for the student and the teacher
    report = evaluate(classcond_run, num_images=4, images_dir=tmp_path / "ev", teacher_steps=2,
                      extra_metrics={"brightness": lambda images, conds: images.float().mean() / 255})
    assert [m["name"] for m in report["metrics"]] == ["brightness", "teacher/brightness"]
    assert report["teacher"]["sampler"] == "dmd2.sampling.sample, deterministic (DDIM)"

    export(classcond_run, tmp_path / "cc")
    assert sorted(p.name for p in (tmp_path / "cc").iterdir()) == ["dmd2.json", "scheduler", "unet"]
    assert (_images(load_student(tmp_path / "cc"), [0, 1], [0, 1], 2) - x).abs().max() < IMAGE_TOL
    with pytest.raises(UserError, match="no diffusers pipeline"):
        export(classcond_run, tmp_path / "cc2", pipeline=True)


def test_sample_labels_all_grid_has_one_class_per_column(classcond_run, tmp_path):
    out = tmp_path / "all"
    run_cli("sample", classcond_run, "--labels", "all", "--num-images", 20, "--out", out)
    labels = [json.loads(line)["label"] for line in (out / "images.jsonl").read_text().splitlines()]
    grid = np.array(Image.open(out / "grid.png"))
    assert grid.shape[:2] == (2 * 18 + 2, 10 * 18 + 2)  # 10 columns x 2 rows of 16 px images, 2 px gaps
    for i in range(20):  # class c in column c
        assert labels[i] == i % 10
        assert np.array_equal(_tile(grid, i // 10, labels[i], 16), _png(out, i).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# one-line errors


def test_one_line_errors(sd15_run, classcond_run, tmp_path, extractor_file):
    from dmd2.evaluate import INCEPTION

    assert "no such run folder or export" in cli_error("sample", tmp_path / "nope", "--out", tmp_path / "o",
                                                       "--prompt", "a")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(sd15_run / "recipe.yaml", empty / "recipe.yaml")
    assert "no committed checkpoint" in cli_error("sample", empty, "--out", tmp_path / "o", "--prompt", "a")
    assert "no committed checkpoint" in cli_error("export", empty, "--out", tmp_path / "e")
    assert "neither a run folder" in cli_error("eval", tmp_path, "--clip", "--clip-model", "x")
    msg = cli_error("sample", classcond_run, "--out", tmp_path / "o", "--label", 3, "--label", 12)
    assert "--label 12: out of range; the model has 10 classes (0..9)" in msg
    assert "--labels 'some'" in cli_error("sample", classcond_run, "--out", tmp_path / "o", "--labels", "some")
    msg = cli_error("sample", sd15_run, "--out", tmp_path / "o", "--prompt", "a", "--steps", 3)
    assert "--steps 3: the generator was trained for 2 step(s) at timesteps [999, 499]" in msg
    assert "--timesteps" in cli_error("sample", sd15_run, "--out", tmp_path / "o", "--prompt", "a",
                                      "--timesteps", "999,x")
    assert "pass --prompt or --prompts-file" in cli_error("sample", sd15_run, "--out", tmp_path / "o")
    assert "--fid needs --ref-dir" in cli_error("eval", sd15_run, "--fid", "--prompts-file", "x.txt")
    assert "--draw-only scores nothing: drop --fid" in cli_error("eval", sd15_run, "--draw-only", "--fid",
                                                                 "--out", tmp_path / "r.json")
    assert "--draw-only keeps the images" in cli_error("eval", sd15_run, "--draw-only")
    assert "--ref-dir" in cli_error("eval", sd15_run, "--fid", "--ref-dir", tmp_path / "nope")
    assert "--clip-model 'no/such-model'" in cli_error("eval", sd15_run, "--clip", "--clip-model", "no/such-model",
                                                      "--prompts-file", REPO / "recipes/data/tiny_prompts.txt",
                                                      "--num-images", 1)
    if not INCEPTION.exists():  # offline and no Inception: say what to pass
        msg = cli_error("eval", sd15_run, "--fid", "--ref-dir", TINY_IMAGES, "--num-images", 1,
                        "--prompts-file", REPO / "recipes/data/tiny_prompts.txt")
        assert "pass --feature-extractor PATH" in msg
    assert "exists and is not an empty folder" in cli_error("export", sd15_run, "--out", sd15_run)
    assert "--format lora: " in cli_error("export", sd15_run, "--out", tmp_path / "l", "--format", "lora")
