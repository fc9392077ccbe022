"""The DMD2 training loop: setup -> resume -> (critic step, generator step every k) -> log -> save."""

from __future__ import annotations

import resource
import signal
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, engines, faults
from .config import Recipe, recipe_to_yaml
from .data import RealImages, batch_indices, load_prompts
from .distill import Batch, critic_loss, generator_input, generator_loss
from .ema import ShardedEMA
from .errors import UserError
from .files import sha256_file
from .logs import RunLogger, phase
from .models import Conditioner, cond_to, load_teacher
from .models.roles import build_roles, set_phase
from .runlock import RunLock
from .sampling import Noise, sample

# Recipe fields that may change when a run is resumed; any other change is refused.
RESUMABLE_CHANGES = ("output_dir", "train.max_steps", "train.checkpoint_every", "train.keep_last", "train.resume_from",
                     "train.max_bad_steps", "train.collective_timeout_s", "logging.")


def seed_for(*parts: int) -> int:
    """A 63-bit seed from (seed, rank, step, ...): resumed runs replay, ranks draw differently."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_compatible(run_dir: Path, recipe: Recipe) -> None:
    """A run folder holding a different run is refused before anything is written."""
    import yaml

    saved = run_dir / "recipe.yaml"
    if not (saved.is_file() and checkpoint.latest(run_dir)):
        return
    old = yaml.safe_load(saved.read_text())
    try:  # fields added since the run started compare at their defaults
        old = Recipe.model_validate(old).model_dump(mode="json")
    except ValueError:
        pass
    old, new = _flat(old), _flat(recipe.model_dump(mode="json"))
    cosine = [o for o in ("generator", "critic") if new.get(f"optim.{o}.schedule") == "cosine"]
    if cosine and old.get("train.max_steps") != new.get("train.max_steps"):
        raise UserError(f"{saved}: train.max_steps was {old.get('train.max_steps')!r}, now "
                        f"{new.get('train.max_steps')!r}; optim.{cosine[0]}.schedule is cosine, which decays to the "
                        f"end of the run, so it cannot be extended (use a new output_dir)")
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES):
            raise UserError(f"{saved}: {key} was {old.get(key)!r}, now {new.get(key)!r}; resuming needs the same "
                            f"recipe (only train.max_steps, checkpointing and logging may change) "
                            f"or a new output_dir")


class Setup:
    """Everything loaded and checked before step 0 (and before the run folder is touched)."""

    def __init__(self, recipe: Recipe, rank: int, world: int):
        self.recipe, self.rank, self.world = recipe, rank, world
        self.device = engines.device()
        m, d, t = recipe.model, recipe.data, recipe.train
        with phase(f"teacher loaded: {m.teacher}"):
            self.teacher = load_teacher(m.teacher, m.family, m.teacher_config)
        fam = self.teacher.family
        self.resolution = t.resolution or self.teacher.resolution
        if self.resolution % (self.teacher.vae_scale_factor * 2 ** (len(self.teacher.unet.config.block_out_channels) - 1)):
            raise UserError(f"train.resolution: {self.resolution} is not divisible by the teacher's downsampling")
        if fam == "classcond" and recipe.loss.cfg_scale != 1.0:
            raise UserError(f"loss.cfg_scale: {recipe.loss.cfg_scale} but class-conditional teachers use no CFG (set 1.0)")
        self.prompts = None
        if fam != "classcond":
            if d.prompts is None:
                raise UserError(f"data.prompts: a {fam} teacher needs prompts (a .txt or .jsonl file)")
            self.prompts = load_prompts(d.prompts)
        self.real = None
        if d.real_images is not None:
            self.real = RealImages(d.real_images, self.resolution, labelled=fam == "classcond",
                                   num_classes=self.teacher.num_classes, max_bad_fraction=d.max_bad_fraction)
            self.real.probe()
        self.cond = Conditioner(self.teacher, self.resolution, self.device)
        self.vae = self.teacher.vae.to(self.device) if self.teacher.vae is not None else None
        lat = self.teacher.latent_size(self.resolution)
        self.shape = (t.batch_size, self.teacher.channels, lat, lat)
        self.timesteps = recipe.generator.resolved_timesteps()
        self.cache = self._open_cache() if d.cache and (self.prompts is not None or self.real is not None) else None

    def _open_cache(self):
        """Conditioning encoded once (collective: ranks share the build); the text encoders then
        leave the accelerator, as nothing encodes text any more."""
        from . import cache

        m, d = self.recipe.model, self.recipe.data
        inputs = {"teacher": cache.teacher_fingerprint(m.teacher, m.teacher_config), "family": self.teacher.family,
                  "resolution": self.resolution,
                  "prompts": sha256_file(d.prompts) if self.prompts is not None else None,
                  "real_images": cache.real_images_fingerprint(self.real) if self.real is not None else None}
        text = self.cond.text
        builder = cache.Builder(self.prompts, self.real, self.cond.encode_prompts if text else None, self.encode_images,
                                (lambda: self.cond.uncond(1)) if text else None, self.shape[1:])
        c = cache.open_or_build(cache.default_root(), inputs, builder, rank=self.rank, world=self.world,
                                max_bad_fraction=d.max_bad_fraction)
        if text:
            self._uncond1 = cond_to(c.uncond(), self.device)
            for enc in self.cond.encoders:
                enc.to("cpu")
        if self.real is not None:
            self.real.bad = set(c.bad)
        return c

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> the generator's space (scaled VAE latents, or pixels)."""
        images = images.to(self.device)
        if self.vae is None:
            return images
        lat = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x.float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode((x / self.vae.config.scaling_factor + shift).to(self.vae.dtype)).sample.float()

    def batch(self, step: int, g: torch.Generator) -> Batch:
        """This rank's batch at ``step``: a pure function of (seed, step, rank)."""
        r, t = self.recipe, self.recipe.train
        B = t.batch_size
        if self.prompts is not None:
            idx = batch_indices(len(self.prompts), step, self.rank, self.world, B, t.seed)
            cond = self._prompt_cond(idx)
        else:
            labels = torch.randint(0, self.teacher.num_classes, (B,), generator=g, device=g.device)
            cond = self.cond.encode_labels(labels)
        uncond = None
        if self.cond.text and r.loss.cfg_scale != 1.0:
            uncond = (self.cond.uncond(B) if self.cache is None
                      else {k: v.expand(B, *v.shape[1:]) for k, v in self._uncond1.items()})
        real = real_cond = None
        if self.real is not None:
            ridx = batch_indices(len(self.real), step, self.rank, self.world, B, t.seed + 1)
            if self.cache is not None:
                real, real_cond, used = self.cache.real(ridx)
                real, real_cond = real.to(self.device), cond_to(real_cond, self.device)
                items = [self.real.items[i] for i in used]
            else:
                images, items = self.real.load(ridx)
                real = self.encode_images(images)
                real_cond = self.cond.encode_prompts([it.caption for it in items]) if self.cond.text else None
            if not self.cond.text:
                real_cond = self.cond.encode_labels(torch.tensor([it.label for it in items]))
        return Batch(cond, uncond, real, real_cond)

    def _prompt_cond(self, idx: list[int]) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            return cond_to(self.cache.prompts(idx), self.device)
        return self.cond.encode_prompts([self.prompts[i] for i in idx])

    def preview_cond(self, n: int) -> dict[str, torch.Tensor]:
        if self.prompts is not None:
            return self._prompt_cond([i % len(self.prompts) for i in range(n)])
        return self.cond.encode_labels(torch.arange(n) % self.teacher.num_classes)


def _floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors to floats with one device-to-host copy (one sync), not one per loss."""
    return dict(zip(logs, torch.stack([v.float() for v in logs.values()]).tolist(), strict=True))


class TrainingStopped(Exception):
    """Training cannot go on (non-finite values, a lost rank); str(e) is one line. Exit status 1."""


class Preemption:
    """SIGTERM/SIGINT only set a flag; the loop finishes its step, and all ranks agree to save and
    exit (a signal to one rank stops every rank)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, device, world: int) -> bool:
        if world == 1:  # nobody to agree with: no collective and no host sync every step
            return self.requested
        import deepspeed.comm as dist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(recipe: Recipe) -> Path:
    """Run (or resume) the recipe; returns the run folder."""
    t = recipe.train
    rank, world = engines.init_distributed(timeout_s=t.collective_timeout_s)
    try:
        with RunLock(recipe.output_dir, enabled=rank == 0):  # first: a second writer is refused before it writes
            return _train(recipe, rank, world)
    except RuntimeError as e:
        # gloo/nccl raise when a peer died or a collective timed out: say so in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if any(w in msg.lower() for w in ("connection", "timed out", "timeout", "peer", "broken pipe", "gloo")):
            raise TrainingStopped(f"rank {rank}: lost contact with the other ranks ({msg[:200]}); "
                                  "a rank died or hung. Re-run the same command to resume") from None
        raise


def _train(recipe: Recipe, rank: int, world: int) -> Path:
    t = recipe.train
    torch.manual_seed(t.seed)

    # Load and check everything before step 0; the run folder is written only after this.
    run_dir = Path(recipe.output_dir)
    check_resume_compatible(run_dir, recipe)
    s = Setup(recipe, rank, world)
    ready = phase("engines ready")
    generator, guidance = build_roles(s.teacher, lora=recipe.model.lora, gan=recipe.loss.gan.enabled,
                                      resolution=s.resolution, seed=t.seed, gradient_checkpointing=t.gradient_checkpointing)
    bf16 = engines.use_bf16(t.precision)
    ds = {o: engines.ds_config(t.ds_config, batch_size=t.batch_size, grad_clip=getattr(recipe.optim, o).grad_clip,
                               bf16=bf16, zero_stage=t.zero_stage) for o in ("generator", "critic")}
    gen_updates = -(-t.max_steps // t.update_ratio)  # the generator steps when step % update_ratio == 0
    gen_engine = engines.build_engine(generator, recipe.optim.generator, ds["generator"], gen_updates)
    guidance_engine = engines.build_engine(guidance, recipe.optim.critic, ds["critic"], t.max_steps)
    guide = guidance_engine.module  # the generator phase calls the module, never the engine (Trap 1)
    ema = ShardedEMA(gen_engine, t.ema_decay) if t.ema_decay > 0 else None
    ready.done()

    # Resume from the newest committed checkpoint that verifies (or the one asked for).
    ckpt, warnings = checkpoint.resolve_resume(run_dir, t.resume_from, rank, world)
    start = 0
    if ckpt is not None:
        checkpoint.load(ckpt, gen_engine, guidance_engine)
        if ema is not None:
            ema.load(ckpt / "generator", rank)
        start = checkpoint.read_state(ckpt)["step"]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        checkpoint.clean_partial(run_dir)
    log = RunLogger(run_dir, recipe.logging, rank=rank, max_steps=t.max_steps, start_step=start,
                    recipe=recipe.model_dump(mode="json"))
    for w in warnings:
        log.message(w)
    if s.real is not None and s.real.non_images:
        log.message(f"warning: data.real_images: ignoring {len(s.real.non_images)} non-image files "
                    f"(e.g. {s.real.non_images[0]})")
    if ckpt is not None:
        log.message(f"resumed from {ckpt} at step {start}")
    schedule = s.teacher.schedule
    K = len(s.timesteps)
    preempt = Preemption()
    step_times, bad_streak, skipped = [], 0, 0

    def save(done: int) -> None:
        checkpoint.save(run_dir, done, gen_engine, guidance_engine,
                        {"teacher": recipe.model.teacher, "world_size": world, "timesteps": s.timesteps,
                         "skipped_steps": skipped},
                        keep_last=t.keep_last, rank=rank, protect=ckpt, ema=ema)

    for step in range(start, t.max_steps):
        done = step + 1
        faults.set_step(done)
        tic = time.perf_counter()
        # All randomness of this step derives from (seed, rank, step); k from (seed, step) only,
        # so every rank runs the same number of generator calls (ZeRO-3 gathers are collective).
        g = torch.Generator(s.device).manual_seed(seed_for(t.seed, rank, step))
        torch.manual_seed(seed_for(t.seed, rank, step, 1))
        k = int(np.random.default_rng([t.seed, step]).integers(K)) if K > 1 else 0
        batch = s.batch(step, g)
        x_t, tk = generator_input(gen_engine.module, schedule, s.timesteps, k, s.shape, batch, g,
                                  recipe.generator.backward_simulation, s.device)
        faults.point("step_begin")

        # Generator phase (two time-scale rule: every update_ratio steps), critic frozen.
        # A NaN/Inf loss or gradient gives a non-finite global grad norm, on which DeepSpeed's
        # ZeRO optimizers skip the update on every rank; was_step_applied() reports it.
        metrics: dict[str, float] = {"k": k}
        applied = True
        if step % t.update_ratio == 0:
            set_phase(guide, "generator")
            x = faults.poison_grad("grad_generator", gen_engine(x_t, tk, batch.cond))
            loss_g, logs_g = generator_loss(guide, x, batch, recipe.loss, g)
            loss_g = logs_g["loss_generator"] = faults.poison("loss_generator", loss_g)
            gen_engine.backward(loss_g)
            gen_engine.step()
            gen_applied = gen_engine.was_step_applied()
            applied &= gen_applied
            if ema is not None and gen_applied:
                ema.update()
            set_phase(guide, "critic")
            metrics.update(_floats(logs_g))
        else:
            with torch.no_grad():
                x = gen_engine.module(x_t, tk, batch.cond)

        # Critic phase, every step, on this step's (pre-update) generator sample.
        loss_c, logs_c = guidance_engine(critic_loss, x.detach(), batch, recipe.loss, g)
        loss_c = logs_c["loss_critic"] = faults.poison("loss_critic", loss_c)
        guidance_engine.backward(loss_c)
        guidance_engine.step()
        applied &= guidance_engine.was_step_applied()
        metrics.update(_floats(logs_c))
        faults.point("step_end")

        dt = time.perf_counter() - tic
        step_times.append(dt)
        metrics["lr_generator"] = gen_engine.get_lr()[0]
        metrics["lr_critic"] = guidance_engine.get_lr()[0]
        metrics["step_time_s"] = dt
        metrics["skipped"] = int(not applied)
        log.log(done, metrics, images_per_s=t.batch_size * world / dt)

        # Non-finite values: the step was skipped (weights untouched); too many in a row stop.
        skipped += not applied
        bad_streak = 0 if applied else bad_streak + 1
        if bad_streak >= t.max_bad_steps:
            losses = ", ".join(f"{k_}={v:.4g}" for k_, v in metrics.items() if "loss" in k_)
            last = checkpoint.latest(run_dir)
            raise TrainingStopped(f"step {done}: {bad_streak} consecutive steps with non-finite loss or gradient "
                                  f"({losses}); last good checkpoint: {last or 'none'}")

        # Preview grid (every rank samples: ZeRO-3 gathers are collective).
        if recipe.logging.preview_every and done % recipe.logging.preview_every == 0:
            n = recipe.logging.preview_images
            images = sample(gen_engine.module, schedule, s.preview_cond(n), (n, *s.shape[1:]), s.timesteps,
                            Noise.per_sample(range(n), s.device))
            log.preview(done, s.decode(images))

        # Save state checkpoint; on SIGTERM/SIGINT (any rank) save and exit 0.
        stop = preempt.agreed(s.device, world)
        if done % t.checkpoint_every == 0 or done == t.max_steps or stop:
            save(done)
        if stop:
            log.message(f"preempted: saved step {done} in {run_dir}; re-run the same command to resume")
            log.close()
            return run_dir

    if step_times:
        steady = step_times[1:] or step_times
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log.message(f"done: {t.max_steps} steps in {run_dir} | median step {np.median(steady):.3f} s | "
                    f"peak RSS {peak:.0f} MiB (rank {rank}) | skipped steps {skipped}"
                    + (f" | unreadable images skipped {len(s.real.bad)}" if s.real is not None else ""))
    else:
        log.message(f"{run_dir} already trained to step {start} (raise train.max_steps to continue)")
    log.close()
    return run_dir
