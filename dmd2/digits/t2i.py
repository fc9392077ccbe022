"""Train "digits-t2i": an SDXL-layout text-to-image teacher of the bundled digits, written as an
ordinary ``StableDiffusionXLPipeline`` folder that ``dmd2.models.load_teacher`` reads as ``sdxl``.

    python -m dmd2.digits.t2i recipes/data/digits_t2i_teacher          # train and write the folder
    python -m dmd2.digits.t2i --check recipes/data/digits_t2i_teacher  # quality table (label acc, FID)
    python -m dmd2.digits.t2i --prompts recipes/data/digits_t2i_prompts.txt
    python -m dmd2.digits.t2i --real-images runs/digits/t2i_real       # PNGs + captions.jsonl

What is in the folder (``model_index.json`` for ``StableDiffusionXLPipeline``):

- images: the training split of ``data.load_split``, upscaled 8 -> 16 px by pixel repetition (2x2
  average pooling gives the original digit back exactly), grey replicated to RGB, in [-1, 1];
- ``vae/``: an ``AutoencoderKL`` trained here on them (x2 down: 16 x 16 x 3 -> 8 x 8 x 4), its
  ``scaling_factor`` set to 1 / std of the training latents (scaled latents have unit variance);
- ``text_encoder/`` (``CLIPTextModel``) and ``text_encoder_2/`` (``CLIPTextModelWithProjection``,
  whose projection is the pooled embedding): CLIP's own random initialisation, seeded, frozen,
  never trained. Captions differing only in the digit differ by ~15-25% at and after the digit's
  position and in the pooled embedding, which the UNet learns to tell apart;
- ``tokenizer/``, ``tokenizer_2/``: tiny CLIP BPEs in ``dmd2.tiny``'s layout whose merges are learned
  from the caption words (plus the tiny corpus), so every caption word is one token;
- ``unet/``: ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (pooled embedding + 6
  time ids), DDPM epsilon prediction on the scaled-linear betas (0.00085 -> 0.012, 1000 steps);
- ``scheduler/``: ``EulerDiscreteScheduler`` with those betas, as SDXL ships it but with
  ``timestep_spacing="trailing"``: SDXL's "leading" starts a 1-step sample at t = 1 (no noise level
  at all), trailing starts every sample at t = 999;
- ``digits_t2i_teacher.json``: settings, digest, VAE scale, training times, quality numbers.

Captions come from ``TEMPLATES`` (one of them exactly ``a handwritten digit N``); 10% of the
training captions are dropped to SDXL's unconditional embedding (all-zero prompt and pooled
embeddings, time ids kept: what the pipeline uses with ``force_zeros_for_empty_prompt`` and what
``dmd2.models.conditioning`` uses), so classifier-free guidance works.

Deterministic and seeded (single-threaded CPU): the folder checked in at
``recipes/data/digits_t2i_teacher`` was written by this script with the default settings (3.1 MB;
VAE 155 s + UNet 1116 s on one niced core shared with other jobs; a second run gave the same bytes).

Measured by ``--check`` (1000 images, digits 0..9 and the templates evenly; FID against the
training digits in the digits feature space, as ``make demo``; floor = held-out real digits):

    sampler                calls   FID   precision recall label acc
    real_heldout (n=360)       0   3.44    0.897   0.917   0.989
    teacher@50 no cfg         50  16.60    0.786   0.917   0.761
    teacher@50 cfg 1.5        50   4.23    0.865   0.908   0.903
    teacher@50 cfg 2          50   5.63    0.907   0.864   0.960   <- best: accuracy >= 0.95, FID 1.6x floor
    teacher@50 cfg 2.5        50  10.71    0.917   0.835   0.979
    teacher@50 cfg 3          50  16.64    0.914   0.810   0.987
    teacher@50 cfg 4          50  28.00    0.920   0.740   0.995
    teacher@1 cfg 2            1  42.66    0.766   0.697   0.985
    teacher@4 cfg 2            4  12.37    0.901   0.831   0.968
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import NUM_CLASSES, RESOLUTION
from .data import Split, load_split

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "recipes" / "data" / "digits_t2i_teacher"
PROMPTS_FILE = REPO / "recipes" / "data" / "digits_t2i_prompts.txt"
SCALE = 2  # 8 px digits -> 16 px images
IMAGE_SIZE = RESOLUTION * SCALE

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {n}: the numeral, {word}: the number in words. The first is the one the recipes quote.
TEMPLATES = (
    "a handwritten digit {n}",
    "the number {word}",
    "a drawing of the digit {n}",
    "{n}, handwritten",
    "a handwritten {word}",
    "a picture of the number {n}",
)

_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def caption(template: int, label: int) -> str:
    return TEMPLATES[template].format(n=label, word=NUMBER_WORDS[label])


def all_prompts() -> list[str]:
    """Every template x every digit, template by template (digits 0..9 within each)."""
    return [caption(t, d) for t in range(len(TEMPLATES)) for d in range(NUM_CLASSES)]


def caption_words() -> list[str]:
    import re

    return sorted({w for p in all_prompts() for w in re.findall(r"[a-z]+", p)})


def write_prompts(path: str | Path = PROMPTS_FILE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p + "\n" for p in all_prompts()), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Data


def upscale(images: np.ndarray) -> np.ndarray:
    """N x 8 x 8 uint8 grey -> N x 16 x 16 x 3 uint8 RGB by pixel repetition."""
    big = images.repeat(SCALE, axis=1).repeat(SCALE, axis=2)
    return np.repeat(big[..., None], 3, axis=3)


def downscale(images: torch.Tensor) -> np.ndarray:
    """Images N x 3 x H x W in [-1, 1] -> N x 8 x 8 x 3 uint8: area-pooled to 8 x 8, grey (mean
    of the channels) replicated to RGB, as the digits on disk are."""
    grey = images.float().clamp(-1, 1).mean(1, keepdim=True)
    small = F.adaptive_avg_pool2d(grey, RESOLUTION)
    u8 = ((small + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    return np.repeat(u8[..., None], 3, axis=3)


def downscale_folder(src: str | Path, dst: str | Path, n: int) -> Path:
    """``src/{i:06d}.png`` (i < n, the benchmark's 16 px images) -> ``dst`` at 8 x 8 grey, reduced
    by ``downscale``: the size the digits judges (feature extractor, label classifier) read."""
    from PIL import Image

    from ..generate import load_images

    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for start in range(0, n, 500):
        idx = range(start, min(n, start + 500))
        x = load_images(src, idx).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        for i, img in zip(idx, downscale(x), strict=True):
            Image.fromarray(img).save(dst / f"{i:06d}.png")
    return dst


def training_images(split: Split = Split()) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split as N x 3 x 16 x 16 in [-1, 1] and labels N."""
    images, labels = load_split(split)["train"]
    x = torch.from_numpy(upscale(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return x, torch.from_numpy(labels)


def write_captioned_digits(out: str | Path, split: Split = Split(), seed: int = 0) -> Path:
    """``out/{i:05d}.png`` (the training digits at 16 px, RGB) and ``out/captions.jsonl`` lines
    ``{"file_name", "text"}`` (a template drawn per image with ``seed``): the folder
    ``data.real_images`` reads for text teachers. Kept if ``out/stamp.json`` already matches."""
    from PIL import Image

    from ..files import publish_folder

    key = {"split": asdict(split), "seed": seed, "templates": list(TEMPLATES), "size": IMAGE_SIZE}

    def build(folder: Path) -> None:
        images, labels = load_split(split)["train"]
        templates = np.random.default_rng(seed).integers(0, len(TEMPLATES), len(images))
        lines = []
        for i, (img, y, t) in enumerate(zip(upscale(images), labels, templates, strict=True)):
            name = f"{i:05d}.png"
            Image.fromarray(img).save(folder / name)
            lines.append(json.dumps({"file_name": name, "text": caption(int(t), int(y))}))
        (folder / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    return publish_folder(Path(out), "stamp.json", key, build)


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class VAESettings:
    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    norm_num_groups: int = 16
    latent_channels: int = 4
    # times the KL per latent element, against the per-pixel MSE. 1e-3 vs 1e-4: the same
    # reconstruction (RMSE ~2/255 on 8x8 grey) but latents centred (channel means |m| < 0.3 std, not
    # up to 1.7) and a posterior std half the signal's, i.e. a smoother space to diffuse in.
    kl_weight: float = 1e-3
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100


@dataclass(frozen=True)
class TextSettings:
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    projection_dim: int = 32


@dataclass(frozen=True)
class UNetSettings:
    # (64, 128) costs 2.5x the time per step; the transformer blocks (self-, cross-attention) sit
    # at the 4 x 4 level and in the middle only, as SDXL has none at its highest resolution.
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    addition_time_embed_dim: int = 8
    dropout: float = 0.1
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0  # Hang et al. 2023 loss weight min(SNR, gamma) / SNR


@dataclass(frozen=True)
class T2ISettings:
    vae: VAESettings = field(default_factory=VAESettings)
    text: TextSettings = field(default_factory=TextSettings)
    unet: UNetSettings = field(default_factory=UNetSettings)
    seed: int = 0
    split: Split = Split()

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Components


def write_tokenizer_files(folder: str | Path, *, pad_token: str) -> Path:
    """A tiny CLIP BPE in ``dmd2.tiny``'s layout (its config files, byte symbols, special tokens
    last) whose merges are learned to exhaustion on the tiny corpus plus every caption word, so
    each of those words is a single token."""
    from .. import tiny

    folder = tiny.write_tiny_clip_tokenizer_files(folder, pad_token=pad_token)
    words = tiny._CORPUS.split() + caption_words() * 8
    merges = tiny._learn_merges(words, 100_000)
    base = list(tiny._bytes_to_unicode().values())
    symbols = base + [s + "</w>" for s in base] + [a + b for a, b in merges] + [tiny.BOS_TOKEN, tiny.EOS_TOKEN]
    vocab = {s: i for i, s in enumerate(symbols)}
    assert len(vocab) == len(symbols), "duplicate tokens in the vocabulary"
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    tok.model_max_length = 77
    return tok


def build_text_encoders(tokenizers, s: TextSettings, seed: int, *, both_projected: bool = False):
    """``CLIPTextModel`` and ``CLIPTextModelWithProjection``, randomly initialised (seeded), frozen.
    ``both_projected``: the first one a ``CLIPTextModelWithProjection`` too (SD3's layout; its text
    model gets the same weights, the projection is drawn after them)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    first = CLIPTextModelWithProjection if both_projected else CLIPTextModel
    encoders = []
    for i, (cls, tok, act) in enumerate(((first, tokenizers[0], "quick_gelu"),
                                         (CLIPTextModelWithProjection, tokenizers[1], "gelu"))):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                             num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                             max_position_embeddings=77, projection_dim=s.projection_dim, hidden_act=act,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed + 100 + i)
        encoders.append(cls(cfg).eval().requires_grad_(False))
    return encoders


def build_vae(s: VAESettings, scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    n = len(s.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=s.block_out_channels,
                         layers_per_block=s.layers_per_block, latent_channels=s.latent_channels,
                         norm_num_groups=s.norm_num_groups, sample_size=IMAGE_SIZE, scaling_factor=scaling_factor,
                         force_upcast=False)


def build_unet(s: UNetSettings, text: TextSettings, vae: VAESettings):
    from diffusers import UNet2DConditionModel

    n = len(s.block_out_channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2 ** (len(vae.block_out_channels) - 1),
        in_channels=vae.latent_channels, out_channels=vae.latent_channels,
        block_out_channels=s.block_out_channels, layers_per_block=s.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=2 * text.hidden_size,  # both encoders' penultimate states, concatenated
        attention_head_dim=s.attention_head_dim, norm_num_groups=s.norm_num_groups,
        addition_embed_type="text_time", addition_time_embed_dim=s.addition_time_embed_dim,
        projection_class_embeddings_input_dim=text.projection_dim + 6 * s.addition_time_embed_dim,
        transformer_layers_per_block=1, use_linear_projection=True, dropout=s.dropout,
    )


def build_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**_SD_BETAS, prediction_type="epsilon", interpolation_type="linear",
                                  timestep_spacing="trailing", steps_offset=1, use_karras_sigmas=False)


@torch.no_grad()
def encode_prompts(tokenizers, encoders, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states of both encoders concatenated, pooled projection of the second):
    exactly ``StableDiffusionXLPipeline.encode_prompt`` without CFG."""
    hidden, pooled = [], None
    for tok, enc in zip(tokenizers, encoders, strict=True):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1).float(), pooled.float()


def _lr(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10%."""
    return base * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))


# ---------------------------------------------------------------------------------------------
# Training


def train_vae(x_all: torch.Tensor, s: VAESettings, seed: int, log_every: int = 250):
    """MSE reconstruction + ``kl_weight`` x KL; returns the trained VAE (scaling_factor still 1)."""
    torch.manual_seed(seed)
    vae = build_vae(s).train()
    opt = torch.optim.Adam(vae.parameters(), lr=s.lr)
    g = torch.Generator().manual_seed(seed + 1)
    tic, running = time.time(), []
    for step in range(s.steps):
        idx = torch.randint(0, len(x_all), (s.batch_size,), generator=g)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).mean()
        loss = mse + s.kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = _lr(step, s.steps, s.lr, s.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append((mse.item(), kl.item()))
        if (step + 1) % log_every == 0 or step + 1 == s.steps:
            m, k = np.mean(running, axis=0)
            print(f"vae step {step + 1}/{s.steps} | mse {m:.5f} | kl {k:.3f} | {time.time() - tic:.0f}s", flush=True)
            running = []
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_posterior(vae, x_all: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled)."""
    means, stds = [], []
    for b in x_all.split(batch):
        post = vae.encode(b).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def _caption_table(tokenizers, encoders) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodings of ``all_prompts()`` (row t * 10 + d: template t, digit d)."""
    return encode_prompts(tokenizers, encoders, all_prompts())


def train_unet(lat_mean: torch.Tensor, lat_std: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor,
               pooled: torch.Tensor, s: T2ISettings, log_every: int = 250):
    """DDPM epsilon prediction on scaled latents drawn from each image's posterior, captions from
    the table (template uniform), ``caption_dropout`` of them replaced by zeros. Returns the EMA."""
    from diffusers import DDPMScheduler

    u = s.unet
    torch.manual_seed(s.seed + 2)
    unet = build_unet(u, s.text, s.vae).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.Adam(unet.parameters(), lr=u.lr)
    abar = DDPMScheduler(**_SD_BETAS).alphas_cumprod.float()
    snr = abar / (1 - abar)
    weight = snr.clamp(max=u.min_snr_gamma) / snr if u.min_snr_gamma > 0 else torch.ones_like(snr)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
    g = torch.Generator().manual_seed(s.seed + 3)
    n_templates = len(TEMPLATES)
    tic, running = time.time(), []
    for step in range(u.steps):
        b = u.batch_size
        idx = torch.randint(0, len(lat_mean), (b,), generator=g)
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        row = torch.randint(0, n_templates, (b,), generator=g) * NUM_CLASSES + labels[idx]
        keep = (torch.rand(b, generator=g) >= u.caption_dropout).float()
        ehs = hidden[row] * keep.view(-1, 1, 1)
        cond = {"text_embeds": pooled[row] * keep.view(-1, 1), "time_ids": time_ids.expand(b, -1)}
        out = unet(zt, t, encoder_hidden_states=ehs, added_cond_kwargs=cond).sample
        loss = (weight[t] * ((out - eps) ** 2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, u.steps, u.lr, u.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pu in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(pu, 1 - u.ema_decay)
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == u.steps:
            print(f"unet step {step + 1}/{u.steps} | loss {np.mean(running):.4f} | {time.time() - tic:.0f}s", flush=True)
            running = []
    return ema


def train_t2i(out: str | Path, s: T2ISettings = T2ISettings()) -> Path:
    """Train the VAE, then the UNet, and write the pipeline folder ``out``; returns it."""
    with torch.random.fork_rng(devices=[]):
        return _train_t2i(Path(out), s)


def _train_t2i(out: Path, s: T2ISettings) -> Path:
    x_all, labels = training_images(s.split)
    tic = time.time()
    vae = train_vae(x_all, s.vae, s.seed)
    vae_seconds = time.time() - tic
    mean, std = latent_posterior(vae, x_all)
    g = torch.Generator().manual_seed(s.seed + 4)
    sampled = mean + std * torch.randn(mean.shape, generator=g)
    scaling_factor = float(f"{1.0 / sampled.std().item():.5g}")
    vae.register_to_config(scaling_factor=scaling_factor)
    latent_stats = {"scaling_factor": scaling_factor, "mean": sampled.mean().item(), "std": sampled.std().item(),
                    "channel_mean": [round(v, 4) for v in sampled.mean(dim=(0, 2, 3)).tolist()],
                    "channel_std": [round(v, 4) for v in sampled.std(dim=(0, 2, 3)).tolist()]}
    print(f"latents: {latent_stats}", flush=True)

    tmp = out.with_name(out.name + ".tokenizers")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizers = [load_tokenizer(write_tokenizer_files(tmp / "tokenizer", pad_token="<|endoftext|>")),
                  load_tokenizer(write_tokenizer_files(tmp / "tokenizer_2", pad_token="!"))]
    shutil.rmtree(tmp)
    encoders = build_text_encoders(tokenizers, s.text, s.seed)
    hidden, pooled = _caption_table(tokenizers, encoders)

    tic = time.time()
    unet = train_unet(mean * scaling_factor, std * scaling_factor, labels, hidden, pooled, s)
    unet_seconds = time.time() - tic
    return save_pipeline(out, vae, unet, encoders, tokenizers, s, {
        "latents": latent_stats, "seconds": {"vae": round(vae_seconds), "unet": round(unet_seconds)},
        "threads": torch.get_num_threads()})


def finish_tokenizers(out: Path) -> None:
    """Beside the tokenizer.json that transformers 5 saves: the slow tokenizer's vocab.json and
    merges.txt (older transformers' ``CLIPTokenizer`` reads only those), and no load-time keys."""
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tmp = out / (sub + ".tmp")
        write_tokenizer_files(tmp, pad_token=pad)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            (tmp / name).replace(out / sub / name)
        shutil.rmtree(tmp)
        cfg_path = out / sub / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        for key in ("is_local", "local_files_only"):
            cfg.pop(key, None)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def save_pipeline(out: Path, vae, unet, encoders, tokenizers, s: T2ISettings, record: dict) -> Path:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(encoders[0]),
                                     text_encoder_2=copy.deepcopy(encoders[1]), tokenizer=tokenizers[0],
                                     tokenizer_2=tokenizers[1], unet=copy.deepcopy(unet), scheduler=build_scheduler(),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    # fp16 UNet and VAE (the folder stays small; diffusers loads them as fp32 by default), fp32
    # text encoders: transformers 5 loads a checkpoint in its own dtype, and the pipeline runs the
    # UNet in the text encoders' dtype, so fp16 encoders would break a plain from_pretrained.
    for m in (pipe.vae, pipe.unet):
        m.to(torch.float16)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    finish_tokenizers(out)
    (out / "digits_t2i_teacher.json").write_text(json.dumps({
        "settings": asdict(s), "digest": s.digest(), "made_by": "python -m dmd2.digits.t2i",
        "templates": list(TEMPLATES), **record}, indent=1))
    return out


# ---------------------------------------------------------------------------------------------
# Quality check


@dataclass(frozen=True)
class CheckSettings:
    num_images: int = 1000
    batch_size: int = 250
    seed: int = 0
    # (network steps, guidance scale); guidance 1.0 = no CFG (one call per step)
    runs: tuple[tuple[int, float], ...] = ((50, 1.0), (50, 1.5), (50, 2.0), (50, 2.5), (50, 3.0), (50, 4.0),
                                           (1, 2.0), (4, 2.0))


def check_prompts(n: int) -> list[str]:
    """Image i: digit i mod 10, template (i div 10) mod len(TEMPLATES): classes and templates even."""
    return [caption((i // NUM_CLASSES) % len(TEMPLATES), i % NUM_CLASSES) for i in range(n)]


def check_teacher(folder: str | Path = CHECKED_IN, out: str | Path = "runs/digits/t2i_check",
                  c: CheckSettings = CheckSettings(), cache: str | Path = "runs/digits") -> dict:
    """Sample the teacher through ``dmd2``'s loader and the diffusers SDXL pipeline
    (``generate.teacher_draw``), downscale to 8 x 8 grey, and score each run like ``make demo``:
    FID against the training digits in the digits feature space (clean-fid), precision/recall,
    label accuracy of the prompt's digit; plus the held-out real digits' floor."""
    from ..generate import teacher_draw
    from ..models import load_teacher
    from .demo import prepare
    from .report import Judge, table

    out = Path(out)
    paths = prepare(out, Path(cache), train_teacher=False)
    judge = Judge(paths.features, paths.data / "train")
    rows = [judge.floor(paths.data / "heldout")]
    teacher = load_teacher(str(folder))
    prompts, seeds = check_prompts(c.num_images), [c.seed + i for i in range(c.num_images)]
    results = {}
    for steps, scale in c.runs:
        name = f"teacher@{steps}" + (f" cfg {scale:g}" if scale > 1 else " no cfg")
        d = out / f"steps{steps}_cfg{scale:g}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        tic = time.time()
        for chunk, images in teacher_draw(teacher, prompts, seeds, steps, range(c.num_images), c.batch_size,
                                          cfg_scale=scale, resolution=IMAGE_SIZE, device="cpu"):
            from PIL import Image

            for i, img in zip(chunk, downscale(images), strict=True):
                Image.fromarray(img).save(d / f"{i:06d}.png")
        seconds = time.time() - tic
        row = judge.row(name, steps, d, c.num_images)
        row.images_per_s = c.num_images / seconds
        rows.append(row)
        results[name] = {"steps": steps, "guidance_scale": scale, "fid": row.fid, "precision": row.precision,
                         "recall": row.recall, "label_accuracy": row.label_accuracy, "seconds": round(seconds)}
        print(table(rows), flush=True)
    floor = rows[0]
    return {"protocol": asdict(c), "floor": {"fid": floor.fid, "precision": floor.precision, "recall": floor.recall,
                                             "label_accuracy": floor.label_accuracy},
            "runs": results, "table": table(rows)}


def summarize(res: dict, min_accuracy: float = 0.95, max_fid_ratio: float = 3.0) -> dict:
    """The best guidance scale at 50 steps (lowest FID among the runs with label accuracy >=
    ``min_accuracy``) and whether it meets the teacher's targets (FID <= ``max_fid_ratio`` x floor)."""
    floor = res["floor"]["fid"]
    ok = [r for r in res["runs"].values() if r["steps"] == 50 and r["guidance_scale"] > 1
          and r["label_accuracy"] >= min_accuracy]
    if not ok:
        return {"best_guidance_scale": None, "targets_met": False}
    best = min(ok, key=lambda r: r["fid"])
    return {"best_guidance_scale": best["guidance_scale"], "fid": best["fid"], "fid_over_floor": best["fid"] / floor,
            "label_accuracy": best["label_accuracy"],
            "targets": f"label accuracy >= {min_accuracy}, FID <= {max_fid_ratio} x floor at 50 steps with CFG",
            "targets_met": best["fid"] <= max_fid_ratio * floor}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="teacher folder to write (or to check, with --check)")
    ap.add_argument("--check", action="store_true", help="score the teacher folder instead of training it")
    ap.add_argument("--num-images", type=int, default=CheckSettings.num_images)
    ap.add_argument("--prompts", help="write the prompts file (all templates x 10 digits) here")
    ap.add_argument("--real-images", help="write the training digits as PNGs + captions.jsonl here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.prompts:
        print(write_prompts(args.prompts))
    if args.real_images:
        print(write_captioned_digits(args.real_images))
    if args.out is None:
        return
    if args.check:
        res = check_teacher(args.out, c=CheckSettings(num_images=args.num_images))
        record = Path(args.out) / "digits_t2i_teacher.json"
        meta = json.loads(record.read_text())
        meta["quality"] = {k: v for k, v in res.items() if k != "table"}
        meta["quality"]["summary"] = summarize(res)
        record.write_text(json.dumps(meta, indent=1))
        print(res["table"])
        print(json.dumps(meta["quality"]["summary"], indent=1))
    else:
        train_t2i(args.out, T2ISettings())


if __name__ == "__main__":
    main()
