"""Tiny random teachers in diffusers format, for tests and for trying the tool without weights.

``make_tiny_teacher(family, out)`` writes a folder that plain ``from_pretrained`` calls read:

* ``sd15``           -- ``StableDiffusionPipeline`` folder; 8x8x4 latents, 32x32 RGB images.
* ``sdxl``           -- ``StableDiffusionXLPipeline`` folder; same sizes, two text encoders.
* ``sd3``            -- ``StableDiffusion3Pipeline`` folder: an ``SD3Transformer2DModel`` (patch 2, 4
                        blocks) on 8x8x16 latents of a 16-channel VAE with a shift factor (32x32 RGB),
                        two CLIP encoders with projection, a T5 encoder with an offline Unigram
                        tokenizer, ``FlowMatchEulerDiscreteScheduler`` with shift 3.0 (as SD3).
* ``flux``           -- ``FluxPipeline`` folder, FLUX.1-dev-like: a ``FluxTransformer2DModel`` (2 double-stream
                        and 2 single-stream blocks, RoPE, ``guidance_embeds``: guidance-distilled) on 8x8x16
                        latents packed 2x2 into 16 tokens of 64 (32x32 RGB), a CLIP encoder (its pooled
                        output) and a T5 encoder, the dynamically shifted scheduler FLUX.1-dev ships.
* ``flux-schnell``   -- the same without the guidance embedding and with a static shift of 1.0 (as
                        FLUX.1-schnell): distilled with real CFG.
* ``classcond``      -- pixel-space class-conditional ``unet/`` (``UNet2DModel``, 16x16x3, 10 classes)
                        plus ``scheduler/`` (``DDPMScheduler``, epsilon prediction).
* ``classcond-v``    -- the same with ``prediction_type="v_prediction"``.
* ``classcond-edm``  -- the same UNet with an ``EDMEulerScheduler``.

Weights are random (nothing is downloaded) and deterministic for a given ``seed``.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "flux-schnell", "classcond", "classcond-v", "classcond-edm")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Betas of Stable Diffusion 1.x / XL.
_SD_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}

# Words the tiny tokenizer learns its merges from: prompt words, colours, shapes, common English.
_CORPUS = """
a an the of on in at to and with by for from under over near next behind above below inside outside
photo picture painting drawing image render illustration portrait landscape closeup close up view
cat dog horse bird fish cow sheep lion tiger bear fox wolf rabbit mouse duck owl eagle frog snake
astronaut robot man woman person people child boy girl king queen knight wizard dragon monster
riding sitting standing running walking flying swimming jumping sleeping eating playing holding
car truck bus train plane boat ship bike bicycle house castle tower bridge city street road village
tree flower forest garden grass mountain hill river lake sea ocean beach desert island sky cloud
sun moon star rain snow storm night day morning evening sunset sunrise light shadow fire water
red green blue yellow orange purple pink brown black white gray grey gold silver cyan magenta
dark bright colorful colourful pastel vivid pale deep warm cold
circle square triangle rectangle star stripe stripes striped dot dots spot spots line lines grid
checkerboard checker pattern shape shapes ring disk box cube ball sphere
background foreground plain solid simple small large big tiny huge little round flat
horizontal vertical diagonal left right top bottom middle center centre corner edge
beautiful detailed realistic cinematic lighting style art digital oil watercolor sketch cartoon
anime pixel high quality resolution masterpiece trending artstation highly intricate sharp focus
old new young happy sad cute funny scary strange magic fantasy future futuristic ancient modern
table chair window door wall floor room kitchen bed book cup bowl plate bottle lamp clock
apple banana orange cake bread pizza coffee tea
is are was two three four five many some one
"""

# Words weighted up so they end up as single tokens (the tiny recipes' captions use them).
_PRIORITY = """
a an the of on with and in photo picture background plain
red green blue yellow orange purple pink brown black white gray cyan magenta
circle square triangle stripes striped dots ring grid checkerboard
horizontal vertical diagonal small large cat dog horse astronaut riding
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _learn_merges(words: list[str], max_merges: int) -> list[tuple[str, str]]:
    """Deterministic BPE (CLIP style: the last symbol of a word carries ``</w>``)."""
    freq = Counter(words)
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in freq}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += freq[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def write_tiny_clip_tokenizer_files(
    folder: str | Path, *, pad_token: str = EOS_TOKEN, vocab_size: int = 1000
) -> Path:
    """Write vocab.json / merges.txt / tokenizer_config.json / special_tokens_map.json of a tiny CLIP BPE.

    The vocabulary is laid out like CLIP's: 256 byte symbols, the same with ``</w>``, the learned
    merges, then ``<|startoftext|>`` and ``<|endoftext|>`` as the two last ids.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    symbols = base + [s + "</w>" for s in base]
    words = _CORPUS.split() + _PRIORITY.split() * 8
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)
    merges = _learn_merges(words, vocab_size - len(symbols) - 2)
    symbols += [a + b for a, b in merges]
    symbols += [BOS_TOKEN, EOS_TOKEN]
    vocab = {s: i for i, s in enumerate(symbols)}
    assert len(vocab) == len(symbols), "duplicate tokens in the tiny vocabulary"

    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def make_tiny_clip_tokenizer(*, pad_token: str = EOS_TOKEN):
    """A tiny ``CLIPTokenizer`` (about 1000 ids) loaded with ``from_pretrained`` from written files.

    (transformers 5's ``CLIPTokenizer(vocab_file=..., merges_file=...)`` ignores the files.)
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="dmd2-tiny-tok-") as tmp:
        write_tiny_clip_tokenizer_files(tmp, pad_token=pad_token)
        tok = CLIPTokenizer.from_pretrained(tmp)
    tok.model_max_length = MODEL_MAX_LENGTH
    return tok


def _text_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def _tiny_vae(seed: int, scaling_factor: float, force_upcast: bool, **overrides):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs)


def _tiny_cond_unet(seed: int, **overrides):
    import torch
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**kwargs)


def _make_sd15(out: Path, seed: int) -> None:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet = _tiny_cond_unet(seed)
    vae = _tiny_vae(seed, scaling_factor=0.18215, force_upcast=True)
    tokenizer = make_tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    # What Stable Diffusion 1.5 ships (PNDM, scaled-linear betas, epsilon prediction).
    scheduler = PNDMScheduler(
        **_SD_BETAS,
        prediction_type="epsilon",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def _make_sdxl(out: Path, seed: int) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    time_dim = 8
    unet = _tiny_cond_unet(
        seed,
        cross_attention_dim=64,  # 32 (text_encoder) + 32 (text_encoder_2) penultimate states
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_dim,  # pooled text embeds + 6 time ids
        transformer_layers_per_block=1,
        use_linear_projection=True,
    )
    vae = _tiny_vae(seed, scaling_factor=0.13025, force_upcast=False)
    tokenizer = make_tiny_clip_tokenizer()
    tokenizer_2 = make_tiny_clip_tokenizer(pad_token="!")  # SDXL's OpenCLIP tokenizer pads with "!"
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS,
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


T5_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as T5's (pad, eos, unk)


def make_tiny_t5_tokenizer():
    """A tiny T5 tokenizer built offline: a ``tokenizers`` Unigram over the corpus' words (whole
    words win: one piece scores above its letters), pad/eos/unk at T5's ids, eos appended, no
    sentinel ids. ``save_pretrained`` writes tokenizer.json; ``from_pretrained`` reads it back."""
    import string

    from transformers import T5TokenizerFast

    words = sorted(set(_CORPUS.split()))
    chars = string.ascii_letters + string.digits + ".,;:!?'-"
    vocab = [(t, 0.0) for t in T5_TOKENS] + [("\u2581", -2.0)]
    vocab += [("\u2581" + w, -5.0) for w in words]
    vocab += [("\u2581" + c, -9.0) for c in chars] + [(c, -10.0) for c in chars]
    seen: set[str] = set()
    vocab = [(p, v) for p, v in vocab if not (p in seen or seen.add(p))]  # one entry per piece, the first
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tok.model_max_length = 512  # T5's
    return tok


# The tiny SD3 and FLUX teachers' transformers and schedulers (benchmarks/rig.py builds the same).
TINY_SD3_TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=4,
    attention_head_dim=8,
    num_attention_heads=4,
    # the T5 width: above the two CLIPs' 32 + 32, so the CLIP states are really zero-padded (as 2048 -> 4096)
    joint_attention_dim=80,
    caption_projection_dim=32,  # = heads x head dim: the context stream's width
    pooled_projection_dim=64,  # the two CLIP pooled projections
    pos_embed_max_size=16,  # patches: latents up to 32x32 (128 px)
)
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2x2 (FluxPipeline._pack_latents)
    num_layers=2,  # double-stream (MMDiT) blocks
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,  # the T5 width
    pooled_projection_dim=32,  # the CLIP's hidden size: FluxPipeline conditions on its pooler_output
    axes_dims_rope=(4, 6, 6),  # RoPE over (text/image index, row, column); sums to the head dim
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD3's FlowMatchEulerDiscreteScheduler
# The scheduler configs FLUX.1-schnell and FLUX.1-dev ship: schnell a static shift of 1.0, dev the
# resolution-dependent shift (mu from the image token count; its shift 3.0 is then unused)
_FLUX_SHIFT = dict(base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, **_FLUX_SHIFT)
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, **_FLUX_SHIFT)


def _make_sd3(out: Path, seed: int) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    t5_width = TINY_SD3_TRANSFORMER["joint_attention_dim"]
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
    # SD3's VAE: 16 latent channels, scaling and shift factors, no quant convs
    vae = _tiny_vae(seed, scaling_factor=1.5305, force_upcast=False, latent_channels=16, shift_factor=0.0609,
                    use_quant_conv=False, use_post_quant_conv=False)
    tokenizer = make_tiny_clip_tokenizer()
    tokenizer_2 = make_tiny_clip_tokenizer(pad_token="!")  # OpenCLIP-G's tokenizer pads with "!"
    tokenizer_3 = make_tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu"))
    torch.manual_seed(seed + 2)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=t5_width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=0,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def _make_flux(out: Path, seed: int, schnell: bool) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    t5_width = TINY_FLUX_TRANSFORMER["joint_attention_dim"]
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER, guidance_embeds=not schnell)
    # FLUX.1's VAE: 16 latent channels, its scaling and shift factors, no quant convs
    vae = _tiny_vae(seed, scaling_factor=0.3611, force_upcast=False, latent_channels=16, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False)
    tokenizer = make_tiny_clip_tokenizer()
    tokenizer_2 = make_tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=t5_width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_SCHNELL_SCHEDULER if schnell else FLUX_DEV_SCHEDULER))
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def _make_classcond(out: Path, seed: int, family: str) -> None:
    import torch
    from diffusers import DDPMScheduler, EDMEulerScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=10,
        norm_num_groups=32,
    )
    if family == "classcond-edm":
        scheduler = EDMEulerScheduler(
            sigma_min=0.002,
            sigma_max=80.0,
            sigma_data=0.5,
            num_train_timesteps=1000,
            prediction_type="epsilon",
        )
    else:
        scheduler = DDPMScheduler(
            beta_start=1e-4,
            beta_end=0.02,
            beta_schedule="linear",
            num_train_timesteps=1000,
            prediction_type="v_prediction" if family == "classcond-v" else "epsilon",
        )
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")


def make_tiny_teacher(family: str, out: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random teacher of ``family`` (one of ``FAMILIES``) into ``out`` and return its path."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny teacher family {family!r}; expected one of {', '.join(FAMILIES)}")
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Leave the caller's RNG state alone.
    with torch.random.fork_rng(devices=[]):
        if family == "sd15":
            _make_sd15(out, seed)
        elif family == "sdxl":
            _make_sdxl(out, seed)
        elif family == "sd3":
            _make_sd3(out, seed)
        elif family in ("flux", "flux-schnell"):
            _make_flux(out, seed, schnell=family == "flux-schnell")
        else:
            _make_classcond(out, seed, family)
    return out
