"""Conditioning for each family as a dict of tensors, and the unconditional counterpart (§4, §7).

- SD1.5: CLIP last hidden states; uncond = the encoding of the empty prompt "".
- SDXL: penultimate hidden states of both encoders concatenated (768 + 1280) plus the second
  encoder's pooled projection, and add_time_ids = [H, W, 0, 0, H, W]; uncond = all-zero
  prompt and pooled embeddings with the time ids kept.
- SD3: as StableDiffusion3Pipeline.encode_prompt (diffusers): CLIP-L and CLIP-G penultimate
  hidden states concatenated (77 tokens), zero-padded to T5's width, then T5's last hidden states
  (256 tokens, the pipeline's max_sequence_length default) appended along the sequence; pooled =
  both CLIP pooled projections concatenated; uncond = the pipeline's encoding of the empty
  negative prompt "" (not zeros: SD3 has no force_zeros_for_empty_prompt). Without T5 (SD3's
  T5-free mode) the 256 zero tokens are one zero token here, unless ``compact_t5=False``: the loader
  gives such a transformer ``attention.RepeatedTokenJointAttnProcessor``, the same function at a
  quarter of the tokens.
- FLUX: as FluxPipeline.encode_prompt (diffusers): pooled_projections = CLIP's pooler_output (77
  tokens), encoder_hidden_states = T5's last hidden states (512 tokens, the pipeline's
  max_sequence_length default); its text_ids are zeros, made where the transformer is called
  (denoiser.py). uncond = the encoding of "" (FluxPipeline's negative_prompt path, its true CFG);
  a guidance-distilled teacher (FLUX.1-dev) uses none (models.roles.guided_x0).
- class-conditional: integer labels; no uncond (no CFG). UNet2DConditionModel class-conditional
  teachers still need an encoder_hidden_states argument: a single zero token.
"""

from __future__ import annotations

import torch

from .loader import TEXT_FAMILIES, Teacher

# StableDiffusion3Pipeline's max_sequence_length default: T5 tokens per prompt
SD3_T5_TOKENS = 256
# FluxPipeline's max_sequence_length default (its largest): T5 tokens per prompt
FLUX_T5_TOKENS = 512


def cat_cond(*conds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_to(cond: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in cond.items()}


class Conditioner:
    """Encodes prompts or labels with the teacher's frozen text encoders (outside the engines)."""

    def __init__(self, teacher: Teacher, resolution: int, device: torch.device | str = "cpu",
                 compact_t5: bool = True):
        self.family = teacher.family
        self.encoders = [e.to(device) for e in teacher.text_encoders]
        self.tokenizers = teacher.tokenizers
        self.resolution = resolution
        self.device = torch.device(device)
        self.num_classes = teacher.num_classes
        cad = getattr(teacher.unet.config, "cross_attention_dim", None)
        self._null_context = teacher.family == "classcond" and cad is not None and hasattr(teacher.unet, "get_time_embed")
        self._cross_dim = cad
        self._joint_dim = getattr(teacher.unet.config, "joint_attention_dim", None)  # SD3 transformers
        self._uncond1: dict[str, torch.Tensor] | None = None  # computed once, reused every step
        # SD3 without T5: its zero tokens as one (attention.py); False: the pipeline's own 256
        self._t5_tokens = 1 if compact_t5 and teacher.t5_free else SD3_T5_TOKENS

    @property
    def text(self) -> bool:
        return self.family in TEXT_FAMILIES

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.family == "sd15":
            ids = self._tokenize(self.tokenizers[0], prompts)
            return {"encoder_hidden_states": self.encoders[0](ids)[0].float()}
        if self.family == "sd3":
            return self._encode_sd3(prompts)
        if self.family == "flux":
            return self._encode_flux(prompts)
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders, strict=True):
            out = enc(self._tokenize(tok, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled output (text_embeds)
        res = self.resolution
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=self.device)
        return {
            "encoder_hidden_states": torch.cat(hidden, dim=-1).float(),
            "text_embeds": pooled.float(),
            "time_ids": time_ids.repeat(len(prompts), 1),
        }

    def _encode_sd3(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """StableDiffusion3Pipeline.encode_prompt without clip_skip (diffusers 0.3x-0.4x)."""
        hidden, pooled = [], []
        clip_len = self.tokenizers[0].model_max_length  # the pipeline's tokenizer_max_length, for both CLIPs
        for tok, enc in zip(self.tokenizers[:2], self.encoders[:2], strict=True):
            out = enc(self._tokenize(tok, prompts, clip_len), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])  # text_embeds: the projected pooled output
        if len(self.encoders) > 2:
            t5 = self.encoders[2](self._tokenize(self.tokenizers[2], prompts, SD3_T5_TOKENS))[0]
        else:  # a pipeline without T5: its _get_t5_prompt_embeds returns zeros of the joint width
            t5 = torch.zeros(len(prompts), self._t5_tokens, self._joint_dim, device=self.device)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2).float(),
                "pooled_projections": torch.cat(pooled, dim=-1).float()}

    def _encode_flux(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """FluxPipeline.encode_prompt (diffusers 0.3x-0.4x): _get_clip_prompt_embeds (pooler_output at
        the CLIP tokenizer's model_max_length) and _get_t5_prompt_embeds (max_sequence_length tokens)."""
        clip_ids = self._tokenize(self.tokenizers[0], prompts, self.tokenizers[0].model_max_length)
        pooled = self.encoders[0](clip_ids, output_hidden_states=False).pooler_output
        t5 = self.encoders[1](self._tokenize(self.tokenizers[1], prompts, FLUX_T5_TOKENS), output_hidden_states=False)[0]
        return {"encoder_hidden_states": t5.float(), "pooled_projections": pooled.float()}

    def _tokenize(self, tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    @torch.no_grad()
    def uncond(self, batch: int) -> dict[str, torch.Tensor]:
        """The unconditional embedding for CFG, repeated ``batch`` times."""
        if not self.text:
            raise ValueError("class-conditional teachers have no unconditional embedding (no CFG)")
        if self._uncond1 is None:
            c = self.encode_prompts([""])
            if self.family == "sdxl":
                c = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in c.items()}
            self._uncond1 = c
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._uncond1.items()}

    def encode_labels(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cond = {"class_labels": labels.long().to(self.device)}
        if self._null_context:
            cond["encoder_hidden_states"] = torch.zeros(len(labels), 1, self._cross_dim, device=self.device)
        return cond
