"""``dmd2 eval``: FID (clean-fid) and CLIP score of a generator and of its teacher, with the
paper's protocols (docs/algorithm.md §8).

The pieces are plain functions of uint8 images (N x H x W x 3 tensors) or image folders, so
other scripts can plug in their own feature extractor and extra metrics::

    extractor = load_feature_extractor("inception.pt")       # or any N x 3 x H x W [0, 255] -> N x D callable
    mu, sigma = stats(image_features(images, extractor, Protocol(eval_res=256)))
    fid = frechet_distance(mu, sigma, *reference_stats(ref_dir, extractor, Protocol(eval_res=256)))
    clip = clip_scores(images, prompts, *load_clip("openai/clip-vit-large-patch14")).mean()

Features follow clean-fid's "clean" mode exactly (the protocol transform, then a float PIL
bicubic resize to 299 x 299, values in [0, 255]); ``image_features`` of a tensor equals clean-fid's
``get_folder_features`` of the same images saved as PNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import atomic_write, cache_root, sha256_file
from .generate import (
    barrier,
    choose_timesteps,
    conditions,
    dist_env,
    draw,
    load_images,
    save_images,
    teacher_draw,
    teacher_timesteps,
)
from .models.student import is_export, load_student, teacher_of

# clean-fid downloads its Inception here (features.py); nothing else is fetched by this module.
INCEPTION = Path("/tmp") / "inception-2015-12-05.pt"
NO_EXTRACTOR = ("--fid needs a feature extractor and clean-fid's Inception is not in {path} and cannot be "
                "downloaded ({why}): pass --feature-extractor PATH (a TorchScript module: N x 3 x H x W floats in "
                "[0, 255] -> N x D features; clean-fid's inception-2015-12-05.pt works)")
# folder_features' batch at most: clean-fid resizes every image to 299 x 299 floats (1 MB) first,
# so dmd2 eval --batch-size 250's 2000 made 2 GB tensors whose page faults took 1 to 5 s of the 4 to
# 9 s a 2000-image folder of digits took; at 256, 3.4 to 3.6 s and the same features bit for bit.
FEATURE_BATCH = 256
DOWNLOAD_TIMEOUT_S = 20  # per network operation: no network should fail fast, not hang
CLIP_INSTEAD = "--clip-model PATH of a local folder holding a transformers CLIPModel and its processor"


@dataclass(frozen=True)
class Protocol:
    """How images are prepared before clean-fid's resize to 299 x 299.

    ``eval_res``: centre-crop to a square and resize (PIL bicubic) to eval_res x eval_res, as the
    paper does for COCO (256 for SD1.5, 512 for SDXL); ``patch``: patch FID, the central
    299 x 299 crop at native resolution (smaller images: their central square).
    """

    eval_res: int | None = None
    patch: bool = False

    def transform(self, img: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 -> the image clean-fid then resizes (clean-fid's custom_image_tranform)."""
        if not (self.patch or self.eval_res):
            return img
        h, w = img.shape[:2]
        side = min(h, w, 299) if self.patch else min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = img[top:top + side, left:left + side]
        if not self.patch and side != self.eval_res:
            from PIL import Image

            img = np.asarray(Image.fromarray(img).resize((self.eval_res, self.eval_res), Image.BICUBIC))
        return img

    def describe(self) -> dict:
        prep = ("central 299x299 crop at native resolution" if self.patch else
                f"centre square crop, PIL bicubic to {self.eval_res}" if self.eval_res else "none")
        return {"mode": "clean", "preprocess": prep, "resize": "PIL bicubic (float) to 299x299"}


@dataclass
class FeatureExtractor:
    """N x 3 x H x W float in [0, 255] -> N x D features; ``ident`` keys cached statistics."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    name: str
    ident: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _no_extractor(why: str) -> UserError:
    return UserError(NO_EXTRACTOR.format(path=INCEPTION, why=why))


def _download_inception() -> None:
    """clean-fid's own download, with a timeout (it has none) and into a temporary folder first, so
    an interrupted download never leaves a truncated file where the next run would load it."""
    import socket
    import tempfile

    from cleanfid.downloads_helper import check_download_inception

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib, as clean-fid calls it, uses the default
    try:
        with tempfile.TemporaryDirectory(dir=INCEPTION.parent) as tmp:
            os.replace(check_download_inception(fpath=tmp), INCEPTION)
    except Exception as e:  # no network, proxy, timeout, full disk: all mean "pass one"
        raise _no_extractor(str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__) from None
    finally:
        socket.setdefaulttimeout(old)


def load_feature_extractor(path: str | Path | None = None, device="cpu") -> FeatureExtractor:
    """A TorchScript feature extractor; None: clean-fid's Inception (downloaded once, if possible)."""
    if path is None:
        if not INCEPTION.is_file():
            if _offline():
                raise _no_extractor("offline: HF_HUB_OFFLINE is set")
            _download_inception()
        path = INCEPTION
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--feature-extractor {path}: no such file")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, and clean-fid's format
            model = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--feature-extractor {path}: not a TorchScript module ({str(e).strip().splitlines()[0]})") from None
    if hasattr(model, "layers"):  # clean-fid's Inception: features from its layers, as cleanfid's InceptionV3W
        def fn(x):
            return model.layers.forward((x - 128) / 128).reshape(x.shape[0], -1)
    else:
        fn = model
    return FeatureExtractor(fn, path.name, sha256_file(path))


# ---------------------------------------------------------------------------------------------
# FID


def image_features(images: torch.Tensor, extractor: Callable, protocol: Protocol = Protocol(),
                   batch_size: int = 64, device="cpu") -> np.ndarray:
    """N x H x W x 3 uint8 -> N x D features, as clean-fid computes them for image files."""
    from cleanfid.fid import get_batch_features
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    feats = []
    for i in range(0, len(images), batch_size):
        rows = [resize(protocol.transform(img.numpy())) for img in images[i:i + batch_size]]
        batch = torch.from_numpy(np.stack(rows).transpose(0, 3, 1, 2).copy())
        feats.append(get_batch_features(batch, extractor, torch.device(device)))
    return np.concatenate(feats)


def folder_features(folder: str | Path, extractor: Callable, protocol: Protocol = Protocol(),
                    batch_size: int = 64, device="cpu", progress: str | None = None) -> np.ndarray:
    """Features of every image under ``folder`` (clean-fid's own folder reader, offline settings);
    ``progress``: the description of clean-fid's progress bar, None for none."""
    from cleanfid.fid import get_folder_features

    return get_folder_features(str(folder), extractor, num_workers=0, batch_size=min(batch_size, FEATURE_BATCH),
                               device=torch.device(device), mode="clean", verbose=progress is not None,
                               description=progress or "", custom_image_tranform=protocol.transform)


def stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    import warnings

    from cleanfid.fid import frechet_distance as fd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # clean-fid passes scipy's deprecated sqrtm(disp=)
        return float(fd(mu1, sigma1, mu2, sigma2))


def _image_files(folder: Path) -> list[Path]:
    from cleanfid.utils import EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in EXTENSIONS)


def default_cache() -> Path:
    return cache_root("fid_stats")


def reference_stats(ref: str | Path, extractor: FeatureExtractor | None = None, protocol: Protocol = Protocol(), *,
                    cache_dir: str | Path | None = None, batch_size: int = 64, device="cpu",
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference: a statistics .npz (keys mu, sigma, as clean-fid writes them),
    or a folder of images, computed once and cached under a key of extractor + protocol + files."""
    ref = Path(ref)
    if ref.is_file():
        try:
            with np.load(ref) as f:
                return f["mu"], f["sigma"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--ref-stats {ref}: not a statistics .npz with mu and sigma ({e})") from None
    if not ref.is_dir():
        raise UserError(f"{ref}: no such reference folder or statistics file")
    files = _image_files(ref)
    if len(files) < 2:
        raise UserError(f"--ref-dir {ref}: needs at least 2 images, found {len(files)}")
    listing = [(str(f.relative_to(ref)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([extractor.ident, protocol.describe(), str(ref.resolve()), listing]).encode())
    cache = Path(cache_dir) if cache_dir else default_cache()
    path = cache / f"{ref.resolve().name}-{key.hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["mu"], f["sigma"]
    mu, sigma = stats(folder_features(ref, extractor, protocol, batch_size, device,
                                      progress="reference statistics" if progress else None))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=len(files))
    os.replace(tmp, path)
    return mu, sigma


# ---------------------------------------------------------------------------------------------
# CLIP score


def load_clip(name: str, device="cpu"):
    """(CLIPModel, processor) from a hub id or a local folder, through transformers."""
    from transformers import AutoProcessor, CLIPModel

    from .hub import require

    require(name, "config.json", what="--clip-model", instead=CLIP_INSTEAD)
    try:
        model = CLIPModel.from_pretrained(name).to(device).eval()
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--clip-model {name!r}: cannot load a CLIP model ({first}); pass a local folder holding a "
                        "transformers CLIPModel and its processor") from None
    return model, processor


@torch.no_grad()
def clip_scores(images: torch.Tensor, prompts: Sequence[str], model, processor, batch_size: int = 64) -> torch.Tensor:
    """Cosine similarity of each image's and its prompt's CLIP embeddings (N values in [-1, 1])."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        inputs = processor(text=list(prompts[i:i + batch_size]), images=list(images[i:i + batch_size].numpy()),
                           return_tensors="pt", padding=True, truncation=True)
        o = model(**{k: v.to(device) for k, v in inputs.items()})
        out.append((o.image_embeds * o.text_embeds).sum(-1).float().cpu())  # both L2-normalised by CLIPModel
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# The eval command


class _Clock:
    """Wraps a ``draw`` loop: the seconds spent in it (drawing, decoding), not in the loop's body
    (saving), and the images it yielded, for ``rate``."""

    def __init__(self):
        self.seconds, self.images = 0.0, 0

    def __call__(self, batches):
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                chunk, images = next(it)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - t
            self.images += len(chunk)
            yield chunk, images

    def rate(self, world: int = 1) -> float | None:
        """Images/s of all ``world`` ranks, from this rank's (each draws an equal share at once)."""
        return round(self.images * world / self.seconds, 3) if self.seconds > 0 else None


def _fresh(folder: Path, rank: int, world: int) -> Path:
    """An empty folder for this eval's images (stale files would enter the statistics)."""
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    barrier(world)
    return folder


def evaluate(source: str | Path, *, fid: bool = False, clip: bool = False, prompts_file: str | None = None,
             num_images: int | None = None, seed: int = 0, batch_size: int = 8, steps: int | None = None,
             timesteps: Sequence[int] | None = None, ref: str | Path | None = None, eval_res: int | None = None,
             patch_fid: bool = False, feature_extractor: str | None = None, clip_model: str | None = None,
             stats_cache: str | None = None, images_dir: str | Path | None = None, teacher_steps: int | None = None,
             teacher_cfg: float | None = None, out: str | Path | None = None, device=None,
             extra_metrics: dict[str, Callable[[torch.Tensor, list], float]] | None = None,
             ckpt: str | Path | None = None, student: bool = True, draw_only: bool = False) -> dict:
    """Generate ``num_images`` images (image i: seed + i, prompt i of the file or class i mod C), score
    them, and do the same for the teacher if ``teacher_steps``; returns (and writes) the report.
    ``student`` False (with ``teacher_steps``): the teacher alone, the generator only read for its
    recipe and conditioning.

    ``feature_extractor``: a TorchScript path, or a loaded ``FeatureExtractor``. ``extra_metrics``:
    name -> fn(images N x H x W x 3 uint8, conditions) -> float, scored beside FID and CLIP.
    ``ckpt``: score this committed checkpoint folder of the run ``source`` instead of its newest.
    ``draw_only``: keep the images (``images_dir``, or beside ``out``) and score nothing, for metrics
    of the caller's own (make bench-quality's judge scores them once instead of twice).
    """
    import tempfile

    from tqdm import tqdm

    from .data import load_prompts
    from .engines import device as default_device
    from .logs import progress_on

    t0 = time.time()
    rank, world = dist_env()
    show = progress_on()  # rank 0, not --quiet
    # Everything that can be checked without models, first.
    if draw_only and (fid or clip or extra_metrics):
        raise UserError("--draw-only scores nothing: drop --fid and --clip")
    if draw_only and images_dir is None and out is None:
        raise UserError("--draw-only keeps the images for your own metrics: pass --images-dir FOLDER or --out FILE")
    if not (fid or clip or extra_metrics or draw_only):
        raise UserError("nothing to measure: pass --fid and/or --clip (or --draw-only to keep the images alone)")
    if fid and ref is None:
        raise UserError("--fid needs --ref-dir (a folder of reference images) or --ref-stats (a statistics .npz)")
    if clip and not clip_model:
        raise UserError("--clip needs --clip-model (a hub id or a local CLIP folder)")
    if not (is_export(source) or (Path(source) / "recipe.yaml").is_file()):
        load_student(source)  # not a model folder: its one-line error comes first, before any model loads
    if clip:
        from .hub import require

        require(clip_model, "config.json", what="--clip-model", instead=CLIP_INSTEAD)  # fast, before any model
    if fid and feature_extractor is None and not INCEPTION.is_file() and _offline():
        raise _no_extractor("offline: HF_HUB_OFFLINE is set")
    if teacher_steps is not None:
        teacher_timesteps(teacher_steps)
    elif not student:
        raise UserError("--teacher-only needs the teacher's sampling steps (--teacher-steps)")
    if images_dir is None:
        if out is not None:
            images_dir = Path(out).with_name(Path(out).stem + "_images")
        elif world == 1:
            images_dir = Path(tempfile.mkdtemp(prefix="dmd2-eval-"))
        else:
            raise UserError("under the launcher, pass --images-dir (a folder every rank can write) or --out")
    images_dir = Path(images_dir)
    if images_dir.exists() and not images_dir.is_dir():
        raise UserError(f"images folder {images_dir}: is a file, not a folder; pass --images-dir FOLDER")
    device = device or default_device()
    prompts = load_prompts(prompts_file, "--prompts-file") if prompts_file else ()

    gen = load_student(source, device, ckpt=ckpt)
    if clip and not gen.cond.text:
        raise UserError("--clip: CLIP score needs a text-to-image model")
    ts = choose_timesteps(gen.timesteps, steps, timesteps)
    conds = conditions(gen, prompts, (), num_images)
    seeds = [seed + i for i in range(len(conds))]
    protocols = {"fid": Protocol(eval_res=eval_res)} if fid else {}
    if fid and patch_fid:
        protocols["patch_fid"] = Protocol(patch=True)

    # Rank 0 loads the metric models and reference statistics before the long part.
    extractor, refs, clipper = None, {}, None
    if rank == 0:
        if fid:
            extractor = (feature_extractor if isinstance(feature_extractor, FeatureExtractor)
                         else load_feature_extractor(feature_extractor, device))
            refs = {name: reference_stats(ref, extractor, p, cache_dir=stats_cache, batch_size=batch_size * 8,
                                          device=device, progress=show) for name, p in protocols.items()}
        if clip:
            clipper = load_clip(clip_model, device)

    def score(folder: Path, prefix: str) -> list[dict]:
        found = []
        for name, p in protocols.items():
            mu, sigma = stats(folder_features(folder, extractor, p, batch_size * 8, device,
                                              progress=f"{prefix}{name} features" if show else None))
            found.append({"name": prefix + name, "value": frechet_distance(mu, sigma, *refs[name])})
        if clip:
            cos = []
            with tqdm(total=len(conds), desc=f"{prefix}CLIP score", unit="img", disable=not show,
                      dynamic_ncols=True) as bar:
                for i in range(0, len(conds), 256):
                    cos.append(clip_scores(load_images(folder, range(i, min(i + 256, len(conds)))), conds[i:i + 256],
                                           *clipper))
                    bar.update(len(cos[-1]))
            found.append({"name": prefix + "clip_score", "value": float(torch.cat(cos).mean())})
        if extra_metrics:
            images = load_images(folder, range(len(conds)))
            found += [{"name": prefix + name, "value": float(fn(images, conds))} for name, fn in extra_metrics.items()]
        return found

    metrics: list[dict] = []
    clock = _Clock()  # the generator's images/s (None when it draws nothing: --teacher-only)
    if student:
        folder = _fresh(images_dir / "student", rank, world)
        for chunk, images in clock(draw(gen, conds, seeds, ts, range(rank, len(conds), world), batch_size,
                                        progress=show)):
            save_images(images, chunk, folder)
        barrier(world)
        if rank == 0:
            metrics += score(folder, "")
    elif rank == 0:  # a generator's images from an earlier eval would read as this one's
        shutil.rmtree(images_dir / "student", ignore_errors=True)
    report = {"metrics": metrics, "n": len(conds), "model": str(Path(source).resolve()), "step": gen.step, "seconds": 0.0,
              "images_per_s": clock.rate(world), "threads": torch.get_num_threads(),
              "protocol": {"seed": seed, "timesteps": ts, "prompts": str(prompts_file) if prompts_file else None, "images": str(images_dir),
                           "reference": str(ref) if fid else None,
                           "feature_extractor": {"name": extractor.name, "sha256": extractor.ident} if extractor else None,
                           "clip_model": clip_model if clip else None,
                           **{name: p.describe() | {"eval_res": p.eval_res} for name, p in protocols.items()}}}
    if ckpt is not None:
        report["checkpoint"] = str(Path(ckpt).resolve())

    if teacher_steps is not None:
        recipe, resolution = gen.recipe, gen.resolution
        del gen  # one UNet in memory at a time
        teacher = teacher_of(recipe, f"{source}: recipe")
        cfg = recipe.loss.cfg_scale if teacher_cfg is None else teacher_cfg
        folder = _fresh(images_dir / f"teacher_{teacher_steps}steps", rank, world)
        clock = _Clock()
        for chunk, images in clock(teacher_draw(teacher, conds, seeds, teacher_steps, range(rank, len(conds), world),
                                                batch_size, cfg_scale=cfg, resolution=resolution, device=device,
                                                progress=show)):
            save_images(images, chunk, folder)
        barrier(world)
        if rank == 0:
            metrics += score(folder, "teacher/")
        sampler = (teacher.scheduler_config["_class_name"] if teacher.family != "classcond" else
                   f"dmd2.sampling.sample, deterministic ({'Euler' if teacher.schedule.kind == 'edm' else 'DDIM'})")
        report["teacher"] = {"source": recipe.model.teacher, "steps": teacher_steps, "sampler": sampler,
                             "cfg_scale": cfg if teacher.family != "classcond" else None,
                             "images_per_s": clock.rate(world)}
    report["seconds"] = round(time.time() - t0, 3)
    if rank == 0 and out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(out), json.dumps(report, indent=1))
        _log_wandb(Path(source), report)
    return report


def _log_wandb(run_dir: Path, report: dict, step_axis: bool = False) -> None:
    """Add the metrics to the run's wandb run (same id as training) when the run logs to wandb;
    ``step_axis``: plot them against ``eval/step`` (the checkpoint's training step), not wandb's own
    step counter, which training has already moved past."""
    from .config import RecipeError, load_recipe

    id_file = run_dir / "wandb_id.txt"
    if not id_file.is_file() or not (run_dir / "recipe.yaml").is_file():
        return
    try:
        cfg = load_recipe(run_dir / "recipe.yaml").logging.wandb
    except RecipeError:
        return
    if cfg.mode == "disabled":
        return
    try:
        import wandb

        run = wandb.init(project=cfg.project, name=cfg.name, entity=cfg.entity, mode=cfg.mode, dir=str(run_dir),
                         id=id_file.read_text().strip(), resume="allow")
        values = {f"eval/{m['name']}": m["value"] for m in report["metrics"]}
        if step_axis:
            run.define_metric("eval/step")
            run.define_metric("eval/*", step_metric="eval/step")
        run.log({**values, "eval/step": report["step"]})
        run.summary.update(values)
        run.finish()
    except Exception as e:  # the report is written; a logging failure must not lose it
        print(f"warning: could not log the report to wandb: {e}", flush=True)


# ---------------------------------------------------------------------------------------------
# Every checkpoint of a run: dmd2 eval RUN --all-checkpoints [--watch]

EVAL_DIR = "eval"  # RUN/eval/: step_XXXXXXXX.json reports, eval.jsonl, images/ (the latest checkpoint's)
REMOVED = "step {step}: checkpoint removed while being scored (train.keep_last); skipped"


def higher_is_better(name: str) -> bool:
    """CLIP score: higher is better; FID and patch FID: lower."""
    return name.endswith("clip_score")


def eval_rows(run: str | Path) -> list[dict]:
    """RUN/eval/eval.jsonl: one row {"step": N, <metric>: value, ...} per scored checkpoint
    (a line torn by a kill mid-append is ignored, so its checkpoint is scored again)."""
    path = Path(run) / EVAL_DIR / "eval.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def best_row(rows: Sequence[dict]) -> tuple[str, dict] | None:
    """(metric, row): the row best by the first metric of the rows (as the report orders them)."""
    if not rows:
        return None
    name = next(k for k in rows[-1] if k != "step")
    scored = [r for r in rows if name in r]
    pick = max if higher_is_better(name) else min
    return name, pick(scored, key=lambda r: r[name])


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def evaluate_all(run: str | Path, *, watch: bool = False, poll_s: float = 60.0, echo: Callable[[str], None] = print,
                 **kwargs) -> list[dict]:
    """Score every committed checkpoint of ``run`` once, oldest first, with ``evaluate(run, ckpt=...,
    **kwargs)``: RUN/eval/step_XXXXXXXX.json (its report) and a row in RUN/eval/eval.jsonl each, and the
    metrics on the run's wandb run against eval/step. Checkpoints with a row are skipped, so a re-run
    resumes. ``watch``: poll every ``poll_s`` seconds until the checkpoint of train.max_steps is scored.

    A checkpoint that train.keep_last rotates away while it is scored is skipped with one line (the
    loader fails, and its COMMITTED marker, which rotation removes first, is gone). Returns the rows.
    """

    run = Path(run)
    if is_export(run) or not (run / "recipe.yaml").is_file():
        raise UserError(f"{run}: --all-checkpoints needs a run folder (recipe.yaml + checkpoints/), not an export "
                        "or another folder")
    if dist_env()[1] > 1:
        raise UserError("--all-checkpoints runs in one process: start it without the deepspeed launcher")
    if kwargs.get("out") is not None:
        raise UserError("--all-checkpoints writes its reports to RUN/eval/; drop --out")
    folder = run / EVAL_DIR
    if kwargs.get("images_dir") is None:
        kwargs["images_dir"] = folder / "images"
    from .runlock import RunLock

    # one evaluator per run: two would score the same checkpoints and write their rows twice
    with RunLock(folder, holder="dmd2 eval --all-checkpoints", field=str(run), instead=""):
        return _evaluate_all(run, folder, watch, poll_s, echo, kwargs)


def _evaluate_all(run: Path, folder: Path, watch: bool, poll_s: float, echo: Callable[[str], None],
                  kwargs: dict) -> list[dict]:
    from . import checkpoint
    from .config import RecipeError, load_recipe

    while True:
        done = {r["step"] for r in eval_rows(run)}
        for ckpt in checkpoint.committed(run):
            try:
                step = int(checkpoint.read_state(ckpt)["step"])
            except (checkpoint.CheckpointError, KeyError):
                continue  # rotated away since it was listed
            if step in done:
                continue
            try:
                report = evaluate(run, ckpt=ckpt, **kwargs)
            except Exception:
                if checkpoint.is_committed(ckpt):
                    raise
                echo(REMOVED.format(step=step))
                continue
            folder.mkdir(exist_ok=True)
            atomic_write(folder / f"step_{step:08d}.json", json.dumps(report, indent=1))
            row = {"step": step, **{m["name"]: m["value"] for m in report["metrics"]}}
            _append_row(folder / "eval.jsonl", row)
            _log_wandb(run, report, step_axis=True)
            done.add(step)
            echo(f"step {step}: " + ", ".join(f"{m['name']} {m['value']:.6g}" for m in report["metrics"]))
        if not watch:
            break
        try:
            final = load_recipe(run / "recipe.yaml").train.max_steps
        except RecipeError as e:
            raise UserError(str(e)) from None
        if final in done:
            break
        time.sleep(poll_s)
    return eval_rows(run)
