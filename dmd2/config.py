"""The recipe: pydantic schema, YAML loading, key.path=value overrides, resolved-recipe dump.

No torch here: a bad recipe is rejected before any heavy import. Every error is one
`RecipeError` line naming the file and the field.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

T = 1000  # num_train_timesteps every supported teacher uses (DDPM T, EDM grid size)

# DeepSpeed templates shipped inside the package (so an installed dmd2 finds them from any folder);
# train.ds_config takes one by name ("zero3", "zero3_offload") or any JSON file by path.
DS_TEMPLATES = Path(__file__).resolve().parent / "ds_configs"
DEFAULT_DS_CONFIG = str(DS_TEMPLATES / "zero3.json")


def ds_template(value: Any) -> str | None:
    """The shipped template a bare name such as "zero3_offload" stands for, else None."""
    if isinstance(value, str) and value and "/" not in value and os.sep not in value:
        path = DS_TEMPLATES / (value if value.endswith(".json") else f"{value}.json")
        if path.is_file():
            return str(path)
    return None

# Strict scalars: YAML already types its values, so `max_steps: true` or `lr: "fast"` is an error
# rather than a silent 1 or a crash later. Floats still accept ints (`cfg_scale: 8`).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Timestep = Annotated[int, Strict(), Field(ge=0, lt=T)]
Beta = Annotated[float, Strict(), Field(ge=0, lt=1)]
Frac = Annotated[float, Strict(), Field(ge=0, le=1)]


class RecipeError(Exception):
    """A recipe that cannot be used; str(e) is one line: '<file>: <field.path>: <what is wrong>'."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


def _rule(field: str, msg: str, got: Any = None) -> PydanticCustomError:
    """A validator error that names its own field (relative to the model it is raised in)."""
    return PydanticCustomError("recipe_rule", msg, {"field": field, "got": got})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# Schema. Defaults live here so recipes stay short.


class LoraConfig(_Section):
    enabled: Bool = False  # the generator trains as a LoRA
    # The fake score trains as a LoRA (same rank/alpha/targets) on the teacher's frozen UNet, which
    # it then shares: adapters off = teacher. Saves a UNet's weights, gradients and Adam state.
    fake_score: Bool = False
    rank: Int = Field(64, ge=1)
    alpha: Float = Field(8.0, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    # On a transformer teacher (SD3) this default list stands for the attention's image and text
    # projections (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out; dmd2.models.lora.TRANSFORMER_TARGETS);
    # on FLUX for those and the double-stream blocks' feed-forwards (dmd2.models.lora.FLUX_TARGETS).
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_in",
            "proj_out",
            "ff.net.0.proj",
            "ff.net.2",
            "conv1",
            "conv2",
            "conv_shortcut",
            "downsamplers.0.conv",
            "upsamplers.0.conv",
            "time_emb_proj",
        ],
        min_length=1,
    )


class ModelConfig(_Section):
    # A hub id, a local diffusers folder, or a single .safetensors file.
    teacher: str = Field(min_length=1)
    # For single-file teachers: a hub id or diffusers folder that supplies the configs.
    teacher_config: str | None = Field(None, min_length=1)
    # Checked against the teacher when it is loaded.
    family: Literal["auto", "sd15", "sdxl", "sd3", "flux", "classcond"] = "auto"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # Warm starts (docs/algorithm.md §10): the generator from a previous run's newest committed
    # checkpoint (its EMA when it kept one) or any `dmd2 export` of the same UNet, e.g. the
    # regression stage's run; the fake score and the GAN head (when both runs have one) from a
    # previous run, e.g. stage 1 of SD1.5. None: copies of the teacher, as in the paper. The
    # optimizers always start fresh. Read only when the run starts, not when it resumes.
    generator_init: str | None = Field(None, min_length=1)
    critic_init: str | None = Field(None, min_length=1)
    # An AutoencoderTiny (a hub id or folder, e.g. madebyollin/taesdxl) that decodes for the
    # regression stage's image-space losses; None: the teacher's own VAE.
    tiny_vae: str | None = Field(None, min_length=1)


class GeneratorConfig(_Section):
    num_steps: Int = Field(1, ge=1, le=T)
    # 1-step only: the timestep the UNet is told for pure noise (999 SD1.5, 399 SDXL; paper §3).
    conditioning_timestep: Timestep = 999
    # Multi-step only; None means T-1 - i*(T // num_steps), e.g. [999, 749, 499, 249].
    timesteps: list[Timestep] | None = None
    backward_simulation: Bool = True

    @field_validator("timesteps")
    @classmethod
    def _descending(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(a <= b for a, b in itertools.pairwise(v)):
            raise ValueError("must be strictly descending")
        return v

    @model_validator(mode="after")
    def _timesteps_match_steps(self) -> GeneratorConfig:
        if self.timesteps is None:
            return self
        if self.num_steps == 1:
            raise _rule(
                "timesteps",
                "is for multi-step generators; a 1-step generator uses generator.conditioning_timestep",
                self.timesteps,
            )
        if len(self.timesteps) != self.num_steps:
            raise _rule("timesteps", f"needs num_steps={self.num_steps} entries", self.timesteps)
        return self

    def resolved_timesteps(self) -> list[int]:
        """The timesteps the generator is called at, first to last."""
        if self.num_steps == 1:
            return [self.conditioning_timestep]
        if self.timesteps is not None:
            return list(self.timesteps)
        return [T - 1 - i * (T // self.num_steps) for i in range(self.num_steps)]


class GanConfig(_Section):
    enabled: Bool = False
    generator_weight: Float = Field(3e-3, ge=0)
    discriminator_weight: Float = Field(1e-2, ge=0)
    # Which fake-score activations the GAN head reads (docs/algorithm.md §6): "mid_block", the
    # bottleneck after the mid-block (the authors' SD code), or "encoder_end", the last down block's
    # output before the mid-block (the authors' EDM ImageNet code). Same channels and size.
    # Transformer teachers (SD3, FLUX): "mid_block" is the output of the middle transformer block
    # ((L-1)//2 of L; FLUX counts its double-stream blocks, then its single-stream ones), an integer
    # the output of that block, as a map of image tokens.
    feature_layer: Literal["mid_block", "encoder_end"] | Annotated[int, Strict(), Field(ge=0)] = "mid_block"


class LossConfig(_Section):
    # Standard CFG form eps_u + w (eps_c - eps_u); 1.0 = conditional only (paper §4).
    cfg_scale: Float = Field(1.0, ge=0)
    # Guidance only where the DM loss's timestep t / T lies in [lo, hi] (inclusive); elsewhere the
    # teacher's conditional prediction (scale 1). None: every timestep, as in the paper (§4). The
    # sampler-side idea of Kynkäänniemi et al. 2024 ("Applying guidance in a limited interval")
    # moved onto the real score of the DM loss (Eq. 2).
    cfg_interval: tuple[Frac, Frac] | None = None
    min_step_frac: Float = Field(0.02, ge=0, le=1)
    max_step_frac: Float = Field(0.98, ge=0, le=1)
    dm_weight: Float = Field(1.0, ge=0)
    fake_weight: Float = Field(1.0, ge=0)
    # Which generator samples the critic (fake score + GAN discriminator) trains on, multi-step:
    # "drawn_step", the output of the step k drawn for the iteration (the paper and the authors'
    # code: the critic then models the mixture of the K steps' outputs), or "last_step", that output
    # carried through the generator's remaining steps without gradient (the distribution sampling
    # draws from). 1-step generators: the same.
    critic_samples: Literal["drawn_step", "last_step"] = "drawn_step"
    # Which generator samples the generator's loss (DM and GAN terms) scores, multi-step:
    # "drawn_step", the output of the step k drawn for the iteration (the paper; docs/algorithm.md §3), or
    # "last_step", that output carried through the generator's remaining steps *with* gradient, so
    # step k is trained for the image sampling finally draws from it; it needs critic_samples:
    # last_step (the fake score must model the samples it scores). Measured on digits-t2i:
    # docs/benchmarks.md, "The 4-step student now improves with training". 1-step generators: the same.
    generator_samples: Literal["drawn_step", "last_step"] = "drawn_step"
    # A weight per generator step on the generator's loss at that step (multi-step; one per
    # generator timestep). None: 1 for every step, as in the paper.
    step_weights: list[Annotated[float, Field(ge=0)]] | None = None
    # The fake score's dropout: "none" (the authors' networks have none; docs/algorithm.md §1) or
    # "teacher", the teacher's own training-time dropout layers, kept at their rates. The fake score
    # never samples, so this is a regulariser of the critic, not the train/sample mismatch the
    # generator must not have (its dropout is always zero). Measured on the digits 1-step student:
    # docs/benchmarks.md, "Missed targets, with their cause".
    fake_score_dropout: Literal["none", "teacher"] = "none"
    gan: GanConfig = Field(default_factory=GanConfig)

    @model_validator(mode="after")
    def _frac_order(self) -> LossConfig:
        if self.min_step_frac >= self.max_step_frac:
            raise _rule(
                "min_step_frac", f"must be < loss.max_step_frac={self.max_step_frac}", self.min_step_frac
            )
        if self.cfg_interval is not None and self.cfg_interval[0] > self.cfg_interval[1]:
            raise _rule("cfg_interval", "needs lo <= hi", list(self.cfg_interval))
        if self.generator_samples == "last_step" and self.critic_samples != "last_step":
            raise _rule("generator_samples", "last_step scores the generator's last-step output with the fake "
                        "score, which then must model it; set loss.critic_samples: last_step", "last_step")
        return self


class OptimizerConfig(_Section):
    lr: Float = Field(2e-6, gt=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    weight_decay: Float = Field(0.01, ge=0)
    eps: Float = Field(1e-8, gt=0)
    warmup_steps: Int = Field(0, ge=0)
    # After warmup: "constant", or "cosine" decay to min_lr_ratio x lr at train.max_steps (a run on
    # cosine then cannot be extended: raising max_steps would change the rate of steps already taken).
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: Float = Field(0.0, ge=0, le=1)
    grad_clip: Float = Field(10.0, gt=0)


class OptimConfig(_Section):
    generator: OptimizerConfig = Field(default_factory=OptimizerConfig)
    critic: OptimizerConfig = Field(default_factory=OptimizerConfig)


class TrainConfig(_Section):
    max_steps: Int = Field(ge=1)
    batch_size: Int = Field(1, ge=1)  # per rank
    # Two time-scale rule (paper §7): the critic updates every step, the generator when
    # step % update_ratio == 0.
    update_ratio: Int = Field(5, ge=1)
    seed: Int = Field(0, ge=0)
    checkpoint_every: Int = Field(500, ge=1)
    keep_last: Int = Field(3, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # 1-3: DeepSpeed's ZeRO optimizers skip a step whose gradient norm is NaN/Inf (the NaN guard
    # relies on it); stage 0 has no such check.
    zero_stage: Int = Field(3, ge=1, le=3)
    ds_config: str = Field(DEFAULT_DS_CONFIG, min_length=1)
    gradient_checkpointing: Bool = True
    # Exponential moving average of the generator's weights, updated after every generator update
    # (0 = off), with diffusers' warm-up: update n uses min(ema_decay, n / (n + 9)). When on,
    # sample/eval/export use the EMA weights.
    ema_decay: Float = Field(0.0, ge=0, lt=1)
    # None: the teacher's native resolution. FLUX teachers record none: set it (FLUX.1: 1024); their
    # noise schedule (FLUX.1-dev's resolution-dependent shift) is built for it.
    resolution: Int | None = Field(None, ge=8)
    # A checkpoint folder to resume from; None resumes from output_dir's newest good checkpoint.
    resume_from: str | None = Field(None, min_length=1)
    # Steps whose loss or gradient is NaN/Inf are skipped; this many in a row stop the run.
    max_bad_steps: Int = Field(20, ge=1)
    # Collectives that wait longer than this (a rank died or hung) fail instead of hanging.
    collective_timeout_s: Float = Field(1800.0, gt=0)


class DataConfig(_Section):
    # .txt, one prompt per line; .jsonl with a "prompt", "caption" or "text" key; a .parquet file or
    # a folder of them, or a Hugging Face `datasets` save_to_disk folder (column data.caption_column).
    prompts: str | None = Field(None, min_length=1)
    # A folder of images + captions.jsonl; class sub-folders (class-conditional teachers: the only
    # form they take); webdataset tar shards as img2dataset writes them: a .tar, a brace pattern
    # ("shards/{00000..00099}.tar") or a folder of .tar files (captions from each sample's .txt or
    # .json); parquet: a .parquet file, a pattern or a folder of them; a Hugging Face `datasets`
    # save_to_disk folder. Tables (parquet, datasets) need pyarrow: pip install "dmd2[data]".
    real_images: str | None = Field(None, min_length=1)
    # The columns of a parquet / datasets source: the image (raw bytes, or Hugging Face's image
    # struct {bytes, path}) and its caption (text; also the prompts' column in data.prompts).
    image_column: str = Field("image", min_length=1)
    caption_column: str = Field("text", min_length=1)
    max_bad_fraction: Float = Field(0.1, ge=0, le=1)
    # Where the generator's prompts come from: data.prompts, or "captions": the captions of the
    # step's real-image batch (what the authors do in multi-step mode; docs/algorithm.md §3).
    generator_prompts: Literal["prompts", "captions"] = "prompts"
    # Encode prompts, the unconditional prompt and real images once, into a keyed cache folder
    # ($DMD2_CACHE_DIR or ~/.cache/dmd2/conditioning), instead of every step (dmd2/cache.py).
    cache: Bool = True


class RegressionConfig(_Section):
    """The regression stage (docs/algorithm.md §10): the generator alone, fitted to the teacher's
    ODE pairs (`dmd2 ode-pairs`) at its conditioning timestep; no critic, no DMD loss."""

    pairs: str = Field(min_length=1)  # the folder `dmd2 ode-pairs` wrote (manifest.json + shards)
    # "lpips": LPIPS (VGG) between decodes in [0, 1], as the authors; needs the `lpips` package and
    # its weights. "mse": in the generator's space (latents). "features": squared distance of a
    # TorchScript feature network's outputs on the decodes (regression.feature_extractor), offline.
    loss: Literal["lpips", "mse", "features"] = "lpips"
    feature_extractor: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _extractor_for_features(self) -> RegressionConfig:
        if self.loss == "features" and self.feature_extractor is None:
            raise _rule("feature_extractor", "loss: features needs a TorchScript feature network (a .pt path)", None)
        return self


class WandbConfig(_Section):
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "dmd2"
    name: str | None = None
    entity: str | None = None


class LoggingConfig(_Section):
    log_every: Int = Field(10, ge=1)
    preview_every: Int = Field(0, ge=0)  # 0 = off
    preview_images: Int = Field(4, ge=1)
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class Recipe(_Section):
    output_dir: str = Field(min_length=1)
    model: ModelConfig
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig
    data: DataConfig = Field(default_factory=DataConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    # Set: this run is the regression stage, not DMD2 (the loss and data.real_images are unused).
    regression: RegressionConfig | None = None

    @model_validator(mode="after")
    def _regression_is_one_step(self) -> Recipe:
        if self.regression is not None:
            if self.generator.num_steps != 1:
                raise _rule("regression", "fits a 1-step generator (the pairs map pure noise to an image); "
                            "set generator.num_steps: 1", "set")
            if self.model.critic_init is not None:
                raise _rule("model.critic_init", "the regression stage trains no critic", self.model.critic_init)
        return self

    @model_validator(mode="after")
    def _fake_score_dropout_needs_own_copy(self) -> Recipe:
        if self.loss.fake_score_dropout == "teacher" and self.model.lora.fake_score:
            raise _rule("loss.fake_score_dropout", "teacher needs a fake score of its own; with "
                        "model.lora.fake_score it shares the teacher's UNet, whose dropout the teacher must not run",
                        "teacher")
        return self

    @model_validator(mode="after")
    def _step_weights_per_step(self) -> Recipe:
        w, k = self.loss.step_weights, self.generator.num_steps
        if w is not None and len(w) != k:
            raise _rule("loss.step_weights", f"needs one weight per generator step ({k})", w)
        return self

    @model_validator(mode="after")
    def _needs_real_images(self) -> Recipe:
        if self.data.real_images is None and self.regression is None:
            if self.data.generator_prompts == "captions":
                raise _rule("data.generator_prompts", "captions come from data.real_images; set it", "captions")
            if self.loss.gan.enabled:
                raise _rule("loss.gan.enabled", "the GAN loss needs data.real_images", True)
            if self.generator.num_steps > 1 and not self.generator.backward_simulation:
                raise _rule(
                    "generator.backward_simulation",
                    "a multi-step generator without backward simulation noises real images; "
                    "set data.real_images",
                    False,
                )
        return self


# ---------------------------------------------------------------------------------------------
# YAML


class _DuplicateKey(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `1e-5` as a float (YAML 1.2 style)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                continue  # unhashable: SafeLoader reports it with its position
            if key in seen:
                raise _DuplicateKey(f"{key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line: `timesteps: [999, 749, 499, 249]`."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _load_yaml(text: str, where: str) -> Any:
    """Parse YAML; errors become one line 'where:line:col: problem'."""
    try:
        return yaml.load(text, Loader=_Loader)
    except _DuplicateKey as e:
        raise RecipeError(f"{where}:{e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise RecipeError(f"{where}{pos}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: invalid YAML: {e}") from None


# ---------------------------------------------------------------------------------------------
# Overrides and paths

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# Paths relative to the recipe's folder when written in the file, to the cwd on the command line.
_PATH_KEYS = {("data", "prompts"), ("data", "real_images"), ("train", "ds_config"), ("train", "resume_from"),
              ("model", "generator_init"), ("model", "critic_init"), ("regression", "pairs"),
              ("regression", "feature_extractor")}
# Left as written unless they name an existing relative path (they may be hub ids).
_MAYBE_PATH_KEYS = {("model", "teacher"), ("model", "teacher_config"), ("model", "tiny_vae")}


def parse_overrides(
    overrides: Sequence[str], where: str = "command line"
) -> list[tuple[tuple[str, ...], Any]]:
    """'train.max_steps=100' -> (('train', 'max_steps'), 100); values are parsed as YAML."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise RecipeError(
                f"{where}: override {item!r}: expected key.path=value (e.g. train.max_steps=100)"
            )
        value = _load_yaml(text, f"{where}: override {item!r}") if text.strip() else None
        parsed.append((tuple(key.split(".")), value))
    return parsed


def _apply_override(raw: dict, path: tuple[str, ...], value: Any, where: str) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            parent = ".".join(path[: i + 1])
            raise RecipeError(
                f"{where}: {parent}: is not a mapping, cannot set {'.'.join(path)} [set on the command line]"
            )
        node = node[part]
    node[path[-1]] = value


def _resolve_path(value: Any, base: Path, only_if_exists: bool) -> Any:
    if not isinstance(value, str) or not value:
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if only_if_exists and not (base / p).exists():
        return value
    return os.path.normpath(base / p)


def _resolve_paths(raw: dict, base: Path, keys: set[tuple[str, ...]] | None = None) -> None:
    """Make the path fields of a raw recipe absolute against `base` (only `keys` if given)."""
    for path in _PATH_KEYS | _MAYBE_PATH_KEYS:
        section = raw.get(path[0])
        if path == ("train", "ds_config") and isinstance(section, dict) and ds_template(section.get("ds_config")):
            section["ds_config"] = ds_template(section["ds_config"])
            continue
        if (keys is None or path in keys) and isinstance(section, dict) and path[1] in section:
            section[path[1]] = _resolve_path(section[path[1]], base, path in _MAYBE_PATH_KEYS)


# ---------------------------------------------------------------------------------------------
# Validation errors -> one line


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `X`, `X | None`, `Annotated[X, ...]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            if (m := _submodel(arg)) is not None:
                return m
    return None


def _fields_at(loc: Sequence[Any]) -> list[str]:
    """Field names of the section at `loc` (a path of field names from the Recipe)."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        model = _submodel(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _describe(err: dict) -> tuple[tuple, str]:
    """(field path, message) for one pydantic error."""
    loc = tuple(err["loc"])
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "recipe_rule":
        field = ctx["field"]
        return loc + tuple(field.split(".")), f"{err['msg']} (got {_short(ctx['got'])})"
    if kind == "extra_forbidden":
        siblings = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), siblings, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "expected one of: " + ", ".join(siblings)
        return loc, f"unknown key ({hint})"
    if kind == "missing" and loc and isinstance(loc[-1], int):
        return loc[:-1], f"too few items (nothing at index {loc[-1]})"
    if kind == "missing":
        return loc, "required field is missing"
    if kind in _BOUNDS:
        return loc, f"must be {_BOUNDS[kind][0]} {ctx[_BOUNDS[kind][1]]} (got {_short(err['input'])})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return loc, f"must be a mapping (got {_short(err['input'])})"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return loc, "must not be empty"
    msg = re.sub(r"^(Input|String|List|Tuple) should", "must", err["msg"].removeprefix("Value error, "))
    msg = msg.replace(" after validation", "")
    return loc, f"{msg} (got {_short(err['input'])})"


def _one_line(e: ValidationError, where: str, from_cli: list[tuple[str, ...]]) -> RecipeError:
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
    path, msg = _describe(errors[0])
    strpath = tuple(str(p) for p in path)
    if any(strpath[: len(o)] == o or o[: len(strpath)] == strpath for o in from_cli):
        msg += " [set on the command line]"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return RecipeError(f"{where}: {_dotted(path) or '<recipe>'}: {msg}{more}")


def _fill_empty_sections(raw: dict, model: type[BaseModel]) -> None:
    """`logging:` with every child commented out is YAML null; read it as an empty section."""
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is None or name not in raw:
            continue
        if raw[name] is None and field.default is None:
            continue  # an optional section (regression): null means off
        if raw[name] is None:
            raw[name] = {}
        if isinstance(raw[name], dict):
            _fill_empty_sections(raw[name], sub)


# ---------------------------------------------------------------------------------------------
# Public API


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, resolve and validate a recipe; raises RecipeError (one line) on any problem."""
    where = str(path)
    parsed = parse_overrides(overrides, where)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{where}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{where}: cannot read the recipe ({e.__class__.__name__}: {e})") from None
    raw = _load_yaml(text, where)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: the top level must be a mapping of sections (got {type(raw).__name__})")

    _resolve_paths(raw, Path(path).resolve().parent)
    for key, value in parsed:
        _apply_override(raw, key, value, where)
    _resolve_paths(raw, Path.cwd(), keys={key for key, _ in parsed})
    _fill_empty_sections(raw, Recipe)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise _one_line(e, where, [key for key, _ in parsed]) from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe with every field; load_recipe() reads it back to an equal Recipe."""
    return yaml.dump(recipe.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False, width=1000)
