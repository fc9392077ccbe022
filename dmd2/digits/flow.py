"""Train "digits-flow": the flow-matching (SD3-style) sibling of digits-t2i, written as an ordinary
``StableDiffusion3Pipeline`` folder that ``StableDiffusion3Pipeline.from_pretrained`` loads and
samples with no dmd2 code.

    python -m dmd2.digits.flow recipes/data/digits_flow_teacher          # train and write the folder
    python -m dmd2.digits.flow --check recipes/data/digits_flow_teacher  # quality table (label acc, FID)

What is in the folder (``model_index.json`` for ``StableDiffusion3Pipeline``):

- the data, captions (``t2i.TEMPLATES``), prompts and tokenizers of digits-t2i (``dmd2.digits.t2i``);
- ``vae/``: the digits-t2i VAE itself, loaded from ``recipes/data/digits_t2i_teacher/vae`` (same
  latent space, same ``scaling_factor``) with ``shift_factor`` 0.0, so that the SD3 pipeline's
  decode (``latents / scaling_factor + shift_factor``) is digits-t2i's;
- ``text_encoder/``, ``text_encoder_2/``: two ``CLIPTextModelWithProjection`` built by
  ``t2i.build_text_encoders`` (seeded random, frozen; the first one's text model has digits-t2i's
  weights, its projection is new), no T5: ``text_encoder_3`` / ``tokenizer_3`` are null, and the
  pipeline fills the T5 part of the context with 256 zero tokens;
- ``transformer/``: a tiny ``SD3Transformer2DModel`` (8 x 8 x 4 latents, patch 2: 16 image tokens;
  ``joint_attention_dim`` 64 = both CLIPs' penultimate states concatenated, ``pooled_projection_dim``
  64 = both projections concatenated) predicting the velocity ``eps - x0`` at timestep ``1000 s``;
- ``scheduler/``: ``FlowMatchEulerDiscreteScheduler`` (1000 training steps, ``shift`` = ``SHIFT``);
- ``digits_flow_teacher.json``: settings, digest, training times, quality numbers.

Training is SD3's rectified flow: ``x_s = (1 - s) x0 + s eps`` with ``s`` uniform (see below; SD3's
default logit-normal is the ``timesteps`` setting's other value), plain MSE on ``v = eps - x0``. The conditioning is exactly the pipeline's
``encode_prompt`` (checked by the tests): CLIP-L and CLIP-G penultimate hidden states concatenated
along features (77 x 64; no padding needed as the T5 width is ``joint_attention_dim`` = 64), then
256 zero T5 tokens along the sequence; pooled = both projections concatenated. 10% of the captions
are dropped to the pipeline's encoding of the empty negative prompt ``""`` (SD3 encodes it with the
CLIPs, it does not use zeros), so classifier-free guidance works as the pipeline does it.

The 256 zero tokens are identical all through the transformer (SD3 adds no position to the
context), so training runs them as one token whose attention logit gets ``log 256`` added
(``models.attention.RepeatedTokenJointAttnProcessor``): the same function (checked by the tests against the plain
333-token forward) at a quarter of the cost. ``--check`` samples through the pipeline the same way.

Timesteps: uniform, not SD3's logit-normal. At 8 x 8 x 4 latents the first steps (s > 0.9) decide
the digit, and logit-normal(0, 1) trains there on 1.4% of the samples. A 200-image screen of two
2400-step teachers (both still with the EMA defect below), 50 steps, CFG 4: logit-normal FID 156.0,
label accuracy 0.605; uniform 140.8, 0.665; the scheduler's shift (1 vs 3) changed little.

The EMA warms up as diffusers' EMAModel does (``ema_warmup``): without it, 0.999^2400 = 9% of the
random initial weights were still in the first checked-in teacher (2400 steps: FID 139.5, label
accuracy 0.68 at 50 steps with CFG 4, 309.0 / 0.27 without CFG), and 600- and 1200-step screens
of other settings (patch 1, SD3.5-style dual attention with RMS qk-norm, jointly trained CLIP
projections) drew noise for the same reason: a screen of an EMA that is mostly initial weights
measures nothing. With the warm-up and 4000 steps (1601 s on one core beside other work) the
teacher meets the issue's bar. ``--check``, 1000 images, digits and templates evenly, FID in the
digits feature space against the training digits, floor = held-out real digits:

    sampler                    calls   FID   precision recall label acc
    real_heldout (n=360)           0   3.44    0.897   0.917   0.989
    teacher@50 no cfg             50  12.72    0.780   0.893   0.959
    teacher@50 cfg 1.5            50  10.28    0.878   0.811   0.999   (best: 2.99x the floor)
    teacher@50 cfg 2              50  29.76    0.907   0.697   1.000
    teacher@50 cfg 3              50  59.94    0.892   0.444   1.000
    teacher@50 cfg 4              50  76.44    0.859   0.340   1.000
    teacher@1 cfg 1.5              1  95.06    0.982   0.003   1.000
    teacher@4 cfg 1.5              4  34.52    0.960   0.417   1.000
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.attention import fold_zero_tokens, unfold_zero_tokens
from . import NUM_CLASSES, t2i
from .data import Split

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "recipes" / "data" / "digits_flow_teacher"
T2I_VAE = t2i.CHECKED_IN / "vae"
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: zero tokens without T5
CLIP_TOKENS = 77  # the CLIP tokenizers' model_max_length (t2i.build_tokenizers)
SHIFT = 3.0  # the scheduler's shift, chosen by --check (not a training setting)


@dataclass(frozen=True)
class TransformerSettings:
    num_layers: int = 4
    attention_head_dim: int = 16
    num_attention_heads: int = 4
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    # diffusers' EMA warm-up, update n at min(ema_decay, (1 + n) / (10 + n)): without it 0.999^2400 =
    # 9% of the random initial weights were still in the checked-in teacher after 2400 steps
    ema_warmup: bool = True
    caption_dropout: float = 0.1
    # "uniform" or "logit_normal" (SD3's default; with mean 0, std 1 it trains s > 0.9 on 1.4% of
    # the samples, and at 8 x 8 x 4 those first steps decide the digit: see the module docstring)
    timesteps: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass(frozen=True)
class FlowSettings:
    transformer: TransformerSettings = field(default_factory=TransformerSettings)
    text: t2i.TextSettings = field(default_factory=t2i.TextSettings)
    seed: int = 0
    split: Split = Split()

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Components


def load_vae():
    """The digits-t2i VAE (fp32), ``shift_factor`` 0.0 for the SD3 pipeline."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(T2I_VAE), torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def build_transformer(s: TransformerSettings, text: t2i.TextSettings, latent_channels: int = 4):
    from diffusers import SD3Transformer2DModel

    inner = s.num_attention_heads * s.attention_head_dim
    return SD3Transformer2DModel(
        sample_size=t2i.IMAGE_SIZE // 2, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=s.num_layers, attention_head_dim=s.attention_head_dim, num_attention_heads=s.num_attention_heads,
        joint_attention_dim=2 * text.hidden_size,  # CLIP-L and CLIP-G penultimate states, concatenated
        caption_projection_dim=inner, pooled_projection_dim=2 * text.projection_dim,
        pos_embed_max_size=t2i.IMAGE_SIZE // 4,  # 4 x 4 patches; the default 96 stores a 96 x 96 table
    )


def build_scheduler(shift: float = SHIFT):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_tokenizers(tmp: Path):
    shutil.rmtree(tmp, ignore_errors=True)
    toks = [t2i.load_tokenizer(t2i.write_tokenizer_files(tmp / "tokenizer", pad_token="<|endoftext|>")),
            t2i.load_tokenizer(t2i.write_tokenizer_files(tmp / "tokenizer_2", pad_token="!"))]
    shutil.rmtree(tmp)
    return toks


@torch.no_grad()
def encode_prompts(tokenizers, encoders, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP part of the context N x 77 x 64, pooled N x 64): ``StableDiffusion3Pipeline.encode_prompt``
    without T5 (its 256 zero tokens follow along the sequence; see ``full_context``)."""
    hidden, pooled = [], []
    for tok, enc in zip(tokenizers, encoders, strict=True):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    return torch.cat(hidden, dim=-1).float(), torch.cat(pooled, dim=-1).float()


def full_context(clip: torch.Tensor, t5_tokens: int = T5_TOKENS) -> torch.Tensor:
    """The pipeline's ``prompt_embeds``: the CLIP part, then ``t5_tokens`` zero tokens."""
    return torch.cat([clip, clip.new_zeros(clip.shape[0], t5_tokens, clip.shape[-1])], dim=1)


def compact_context(clip: torch.Tensor) -> torch.Tensor:
    """The CLIP part and one zero token standing for all of the T5 part (with
    ``RepeatedTokenJointAttnProcessor``)."""
    return full_context(clip, 1)


def use_compact_context(transformer, compact: bool = True) -> None:
    """Fold the context's zero T5 tokens into one (``models.attention``, the loader's own switch for
    T5-free SD3 teachers), or back to diffusers' plain attention."""
    if compact:
        fold_zero_tokens(transformer, CLIP_TOKENS + 1, T5_TOKENS)
    else:
        unfold_zero_tokens(transformer)


def caption_table(tokenizers, encoders) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodings of ``t2i.all_prompts()`` (row t * 10 + d) and, last, of ``""`` (the pipeline's
    negative prompt: the caption-dropout row)."""
    return encode_prompts(tokenizers, encoders, t2i.all_prompts() + [""])


# ---------------------------------------------------------------------------------------------
# Training


def sample_sigmas(n: int, s: TransformerSettings, g: torch.Generator) -> torch.Tensor:
    if s.timesteps == "logit_normal":
        return torch.sigmoid(s.logit_mean + s.logit_std * torch.randn(n, generator=g))
    if s.timesteps == "uniform":
        return torch.rand(n, generator=g)
    raise ValueError(f"unknown timestep sampling {s.timesteps!r}")


def train_transformer(lat_mean: torch.Tensor, lat_std: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor,
                      pooled: torch.Tensor, s: FlowSettings, log_every: int = 250):
    """Rectified flow on scaled latents drawn from each image's posterior; captions from the table
    (template uniform), ``caption_dropout`` of them replaced by the ``""`` row. Returns the EMA."""
    u = s.transformer
    torch.manual_seed(s.seed + 2)
    model = build_transformer(u, s.text, lat_mean.shape[1]).train()
    use_compact_context(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=u.lr)
    context = compact_context(hidden)
    empty = len(hidden) - 1
    g = torch.Generator().manual_seed(s.seed + 3)
    n_templates = len(t2i.TEMPLATES)
    tic, running = time.time(), []
    for step in range(u.steps):
        b = u.batch_size
        idx = torch.randint(0, len(lat_mean), (b,), generator=g)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        sigma = sample_sigmas(b, u, g)
        eps = torch.randn(x0.shape, generator=g)
        sv = sigma.view(-1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * eps
        row = torch.randint(0, n_templates, (b,), generator=g) * NUM_CLASSES + labels[idx]
        row = torch.where(torch.rand(b, generator=g) < u.caption_dropout, empty, row)
        out = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=context[row],
                    pooled_projections=pooled[row]).sample
        loss = F.mse_loss(out, eps - x0)
        for group in opt.param_groups:
            group["lr"] = t2i._lr(step, u.steps, u.lr, u.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(u.ema_decay, (1 + step) / (10 + step)) if u.ema_warmup else u.ema_decay
        with torch.no_grad():
            for pe, pu in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pu, 1 - decay)
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == u.steps:
            print(f"transformer step {step + 1}/{u.steps} | loss {np.mean(running):.4f} | {time.time() - tic:.0f}s",
                  flush=True)
            running = []
    use_compact_context(ema, False)
    return ema


def train_flow(out: str | Path, s: FlowSettings = FlowSettings()) -> Path:
    """Train the transformer on the digits-t2i VAE's latents and write the pipeline folder ``out``."""
    with torch.random.fork_rng(devices=[]):
        return _train_flow(Path(out), s)


def _train_flow(out: Path, s: FlowSettings) -> Path:
    x_all, labels = t2i.training_images(s.split)
    vae = load_vae()
    mean, std = t2i.latent_posterior(vae, x_all)
    sf = vae.config.scaling_factor
    tokenizers = build_tokenizers(out.with_name(out.name + ".tokenizers"))
    encoders = t2i.build_text_encoders(tokenizers, s.text, s.seed, both_projected=True)
    hidden, pooled = caption_table(tokenizers, encoders)
    tic = time.time()
    model = train_transformer(mean * sf, std * sf, labels, hidden, pooled, s)
    seconds = time.time() - tic
    return save_pipeline(out, vae, model, encoders, tokenizers, s, {
        "seconds": {"transformer": round(seconds)}, "threads": torch.get_num_threads()})


def save_pipeline(out: Path, vae, transformer, encoders, tokenizers, s: FlowSettings, record: dict) -> Path:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=copy.deepcopy(transformer), scheduler=build_scheduler(),
                                    vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(encoders[0]),
                                    tokenizer=tokenizers[0], text_encoder_2=copy.deepcopy(encoders[1]),
                                    tokenizer_2=tokenizers[1], text_encoder_3=None, tokenizer_3=None)
    # fp16 transformer and VAE, fp32 text encoders (as digits-t2i: the pipeline runs in the text
    # encoders' dtype, and from_pretrained loads fp32 by default)
    for m in (pipe.vae, pipe.transformer):
        m.to(torch.float16)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    t2i.finish_tokenizers(out)
    (out / "digits_flow_teacher.json").write_text(json.dumps({
        "settings": asdict(s), "digest": s.digest(), "made_by": "python -m dmd2.digits.flow",
        "vae": "recipes/data/digits_t2i_teacher/vae (shift_factor 0.0)", "scheduler_shift": SHIFT,
        "templates": list(t2i.TEMPLATES), **record}, indent=1))
    return out


# ---------------------------------------------------------------------------------------------
# Quality check


@dataclass(frozen=True)
class CheckSettings:
    num_images: int = 1000
    batch_size: int = 250
    seed: int = 0
    # (network steps, guidance scale, scheduler shift); guidance 1.0 = no CFG
    runs: tuple[tuple[int, float, float], ...] = (
        (50, 1.0, SHIFT), (50, 1.5, SHIFT), (50, 2.0, SHIFT), (50, 3.0, SHIFT), (50, 4.0, SHIFT), (1, 1.5, SHIFT),
        (4, 1.5, SHIFT))


def load_pipeline(folder: str | Path = CHECKED_IN):
    from diffusers import StableDiffusion3Pipeline

    # diffusers (0.42) loads a null text_encoder_3 / tokenizer_3 only when they are passed as None
    # (they are not in the pipeline's _optional_components): SD3's documented T5-free loading
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def draw(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, shift: float | None = None,
         compact: bool = True) -> torch.Tensor:
    """Images N x 3 x 16 x 16 in [-1, 1] from the pipeline, one generator per image. ``compact``:
    the pipeline's own embeddings of ``prompts`` and ``""`` with the T5 zeros folded into one token
    (``RepeatedTokenJointAttnProcessor``), the same function as the plain call, 4x faster."""
    if shift is not None:
        pipe.scheduler = build_scheduler(shift)
    kw = {}
    if compact:
        embeds = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=guidance > 1,
                                    max_sequence_length=1)
        kw = dict(zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                       "negative_pooled_prompt_embeds"), embeds, strict=True))
        use_compact_context(pipe.transformer)
    else:
        kw["prompt"] = prompts
    try:
        images = pipe(num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                      generator=[torch.Generator().manual_seed(i) for i in seeds], **kw).images
    finally:
        use_compact_context(pipe.transformer, False)
    return images * 2 - 1


def check_teacher(folder: str | Path = CHECKED_IN, out: str | Path = "runs/digits/flow_check",
                  c: CheckSettings = CheckSettings(), cache: str | Path = "runs/digits") -> dict:
    """Sample through ``StableDiffusion3Pipeline``, downscale to 8 x 8 grey and score each run as
    ``t2i.check_teacher`` does."""
    from PIL import Image

    from .demo import prepare
    from .report import Judge, table

    out = Path(out)
    paths = prepare(out, Path(cache), train_teacher=False)
    judge = Judge(paths.features, paths.data / "train")
    rows = [judge.floor(paths.data / "heldout")]
    pipe = load_pipeline(folder)
    prompts, seeds = t2i.check_prompts(c.num_images), [c.seed + i for i in range(c.num_images)]
    results = {}
    for steps, scale, shift in c.runs:
        name = f"teacher@{steps}" + (f" cfg {scale:g}" if scale > 1 else " no cfg") + f" shift {shift:g}"
        d = out / f"steps{steps}_cfg{scale:g}_shift{shift:g}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        tic = time.time()
        for start in range(0, c.num_images, c.batch_size):
            chunk = range(start, min(c.num_images, start + c.batch_size))
            images = draw(pipe, [prompts[i] for i in chunk], [seeds[i] for i in chunk], steps, scale, shift)
            for i, img in zip(chunk, t2i.downscale(images), strict=True):
                Image.fromarray(img).save(d / f"{i:06d}.png")
        seconds = time.time() - tic
        row = judge.row(name, steps, d, c.num_images)
        row.images_per_s = c.num_images / seconds
        rows.append(row)
        results[name] = {"steps": steps, "guidance_scale": scale, "shift": shift, "fid": row.fid,
                         "precision": row.precision, "recall": row.recall, "label_accuracy": row.label_accuracy,
                         "seconds": round(seconds)}
        print(table(rows), flush=True)
    floor = rows[0]
    return {"protocol": asdict(c), "floor": {"fid": floor.fid, "precision": floor.precision, "recall": floor.recall,
                                             "label_accuracy": floor.label_accuracy},
            "runs": results, "table": table(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="teacher folder to write (or to check, with --check)")
    ap.add_argument("--check", action="store_true", help="score the teacher folder instead of training it")
    ap.add_argument("--num-images", type=int, default=CheckSettings.num_images)
    ap.add_argument("--runs", help="check only these runs: steps:guidance:shift,... (default: CheckSettings')")
    ap.add_argument("--steps", type=int, help="training steps (default: the settings')")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.check:
        c = CheckSettings(num_images=args.num_images)
        if args.runs:
            c = CheckSettings(num_images=args.num_images, runs=tuple(
                (int(a), float(b), float(sh)) for a, b, sh in (r.split(":") for r in args.runs.split(","))))
        res = check_teacher(args.out, c=c)
        record = Path(args.out) / "digits_flow_teacher.json"
        meta = json.loads(record.read_text())
        meta["quality"] = {k: v for k, v in res.items() if k != "table"}
        meta["quality"]["summary"] = t2i.summarize(res)
        record.write_text(json.dumps(meta, indent=1))
        print(res["table"])
        print(json.dumps(meta["quality"]["summary"], indent=1))
    else:
        s = FlowSettings()
        if args.steps:
            from dataclasses import replace

            s = replace(s, transformer=replace(s.transformer, steps=args.steps))
        train_flow(args.out, s)


if __name__ == "__main__":
    main()
