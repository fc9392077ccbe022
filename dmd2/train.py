"""The DMD2 training loop: setup -> resume -> (critic step, generator step every k) -> log -> save."""

from __future__ import annotations

import resource
import signal
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, engines, faults, warmstart
from .config import Recipe, recipe_to_yaml
from .data import build_batches
from .ema import ShardedEMA
from .errors import UserError
from .logs import RunLogger, condition_layout, phase
from .models import load_teacher, vae
from .models.roles import build_roles
from .runlock import RunLock
from .sampling import Noise, sample
from .step import regression_step, to_floats, train_step

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


def _same_file_content(a, b) -> bool:
    try:
        return Path(a).read_bytes() == Path(b).read_bytes()
    except (OSError, TypeError):
        return False


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
        if key == "train.ds_config" and _same_file_content(old.get(key), new.get(key)):
            continue  # the template moved (into the package in 0.2) but says the same
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES):
            raise UserError(f"{saved}: {key} was {old.get(key)!r}, now {new.get(key)!r}; resuming needs the same "
                            f"recipe (only train.max_steps, checkpointing and logging may change) "
                            f"or a new output_dir")


# What shapes the two engines' parameters and saved state: a checkpoint made under other values
# cannot be loaded into these engines (DeepSpeed fails deep inside with a size or key error).
ENGINE_SHAPING = ("model.family", "model.lora.", "loss.gan.enabled", "loss.gan.feature_layer", "train.resolution",
                  "train.ema_decay")


def check_resume_from_fits(recipe: Recipe) -> None:
    """``train.resume_from`` names a checkpoint of another run folder: its recipe must agree on what
    shapes the engines, else a one-line error (before anything loads) naming the setting and the
    warm starts that take weights across such changes."""
    import yaml

    if not recipe.train.resume_from:
        return
    ckpt = Path(recipe.train.resume_from)
    saved = ckpt.parent.parent / "recipe.yaml"
    if ckpt.is_dir() and not (ckpt / "COMMITTED").is_file() and checkpoint.latest(ckpt) is not None:
        raise UserError(f"train.resume_from: {ckpt} is a run folder; name one of its checkpoints, e.g. "
                        f"{checkpoint.latest(ckpt)}")
    if not saved.is_file():
        return  # a checkpoint moved out of its run folder: DeepSpeed's own checks apply
    try:
        old = _flat(Recipe.model_validate(yaml.safe_load(saved.read_text())).model_dump(mode="json"))
    except ValueError:
        return
    new = _flat(recipe.model_dump(mode="json"))
    stage = {k: "the regression stage" if d.get("regression") is not None or any(x.startswith("regression.") for x in d)
             else "DMD2" for k, d in (("old", old), ("new", new))}
    if stage["old"] != stage["new"]:
        raise UserError(f"train.resume_from: {ckpt} is a checkpoint of {stage['old']}, this recipe is {stage['new']} "
                        "(other engines); to start from its generator use model.generator_init")
    for key in sorted(set(old) | set(new)):
        if key.startswith(ENGINE_SHAPING) and old.get(key) != new.get(key):
            if key == "train.ema_decay" and (old.get(key, 0) > 0) == (new.get(key, 0) > 0):
                continue  # only whether an EMA is kept changes what a checkpoint holds
            raise UserError(f"train.resume_from: {ckpt} was trained with {key}={old.get(key)!r}, this recipe has "
                            f"{new.get(key)!r}; resuming needs the same engines. To start from its weights under "
                            "new settings, use model.generator_init / model.critic_init (fresh optimizers)")


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

    # Load and check everything before step 0 (the teacher its own fit, data its files); the run
    # folder is written only after this.
    run_dir = Path(recipe.output_dir)
    check_resume_compatible(run_dir, recipe)
    check_resume_from_fits(recipe)
    device = engines.device()
    m = recipe.model
    with phase(f"teacher loaded: {m.teacher}"):
        teacher = load_teacher(m.teacher, m.family, m.teacher_config, resolution=t.resolution)
    resolution = teacher.training_resolution(t.resolution)
    timesteps = recipe.generator.resolved_timesteps()
    reg = recipe.regression  # the regression stage (docs/algorithm.md §10): the generator alone, on ODE pairs
    if reg is not None:
        from .regression import RegressionBatches, RegressionLoss

        batches = RegressionBatches(reg.pairs, teacher, resolution=resolution, batch_size=t.batch_size,
                                    timestep=timesteps[0], seed=t.seed, rank=rank, world=world, device=device)
        regression_loss = RegressionLoss(reg, teacher, m.tiny_vae, device)
        real = None
    else:
        teacher.check_cfg(recipe.loss.cfg_scale, recipe.loss.cfg_interval)
        batches = build_batches(recipe.data, teacher, resolution=resolution, batch_size=t.batch_size, seed=t.seed,
                                cfg_scale=recipe.loss.cfg_scale, rank=rank, world=world, device=device)
        real = batches.real

    # Warm starts (docs/algorithm.md §10) are read into the modules before the engines wrap them;
    # a run that resumes takes everything from its own checkpoint instead.
    fresh = checkpoint.latest(run_dir) is None and not t.resume_from
    warm = []
    gen_init = None
    if fresh and m.generator_init:
        with phase("generator_init read"):
            gen_init = warmstart.generator_weights(m.generator_init)
        warm.append(gen_init[1])

    # Two engines over unchanged modules (docs/architecture.md), behind the step's Trainee interface.
    ready = phase("engines ready")
    generator, critic_module = build_roles(teacher, lora=recipe.model.lora, gan=recipe.loss.gan.enabled,
                                           resolution=resolution, seed=t.seed,
                                           gradient_checkpointing=t.gradient_checkpointing,
                                           gan_layer=recipe.loss.gan.feature_layer, generator_init=gen_init,
                                           critic=reg is None, cfg_scale=recipe.loss.cfg_scale,
                                           fake_score_dropout=recipe.loss.fake_score_dropout == "teacher")
    del gen_init
    if fresh and m.critic_init:
        warm.append(warmstart.load_critic(critic_module, m.critic_init))
    bf16 = engines.use_bf16(t.precision)
    ds = {o: engines.ds_config(t.ds_config, batch_size=t.batch_size, grad_clip=getattr(recipe.optim, o).grad_clip,
                               bf16=bf16, zero_stage=t.zero_stage) for o in ("generator", "critic")}
    # the generator steps when step % update_ratio == 0 (every step in the regression stage)
    gen_updates = t.max_steps if reg is not None else -(-t.max_steps // t.update_ratio)
    gen_engine = engines.build_engine(generator, recipe.optim.generator, ds["generator"], gen_updates)
    critic_engine = critic = None
    if critic_module is not None:
        critic_engine = engines.build_engine(critic_module, recipe.optim.critic, ds["critic"], t.max_steps)
        critic = faults.wrap(engines.EngineTrainee(critic_engine), "loss_critic")
    ema = ShardedEMA(gen_engine, t.ema_decay) if t.ema_decay > 0 else None
    gen = faults.wrap(engines.EngineTrainee(gen_engine, ema), "loss_generator", "grad_generator")
    ready.done()

    # Resume from the newest committed checkpoint that verifies (or the one asked for).
    ckpt, warnings = checkpoint.resolve_resume(run_dir, t.resume_from, rank, world)
    start = 0
    if ckpt is None and not fresh and (m.generator_init or m.critic_init):
        raise UserError(f"{run_dir}: no checkpoint there verifies, and model.generator_init/critic_init are read "
                        "only when a run starts; move the folder's checkpoints/ away to start over")
    if ckpt is not None:
        checkpoint.load(ckpt, gen_engine, critic_engine)
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
    if real is not None and real.non_images:
        log.message(f"warning: data.real_images: ignoring {len(real.non_images)} non-image files "
                    f"(e.g. {real.non_images[0]})")
    if ckpt is not None:
        log.message(f"resumed from {ckpt} at step {start}")
    for w in warm:
        log.message(f"warm start: {w}")
    schedule = teacher.schedule
    K = len(timesteps)
    preempt = Preemption()
    step_times, bad_streak, skipped = [], 0, 0

    def save(done: int) -> None:
        checkpoint.save(run_dir, done, gen_engine, critic_engine,
                        {"teacher": recipe.model.teacher, "world_size": world, "timesteps": timesteps,
                         "skipped_steps": skipped},
                        keep_last=t.keep_last, rank=rank, protect=ckpt, ema=ema)

    for step in range(start, t.max_steps):
        done = step + 1
        faults.set_step(done)
        tic = time.perf_counter()
        # All randomness of this step derives from (seed, rank, step); k from (seed, step) only,
        # so every rank runs the same number of generator calls (ZeRO-3 gathers are collective).
        rng = torch.Generator(device).manual_seed(seed_for(t.seed, rank, step))
        torch.manual_seed(seed_for(t.seed, rank, step, 1))
        k = int(np.random.default_rng([t.seed, step]).integers(K)) if K > 1 else 0
        if reg is not None:
            pairs = batches(step)
            faults.point("step_begin")
            metrics, applied = regression_step(gen, *pairs, regression_loss)
        else:
            batch = batches(step, rng)
            faults.point("step_begin")
            # One iteration (dmd2/step.py): the generator's update every update_ratio steps, the critic's every step.
            metrics, applied = train_step(gen, critic, batch, k=k, timesteps=timesteps, shape=batches.shape,
                                          loss_cfg=recipe.loss, backward_simulation=recipe.generator.backward_simulation,
                                          generator_turn=step % t.update_ratio == 0, rng=rng, device=device)
        metrics = {"k": k, **to_floats(metrics)}
        faults.point("step_end")

        dt = time.perf_counter() - tic
        step_times.append(dt)
        metrics["lr_generator"] = gen.lr()
        if critic is not None:
            metrics["lr_critic"] = critic.lr()
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
            images = sample(gen.module, schedule, batches.preview_cond(n), (n, *batches.shape[1:]), timesteps,
                            Noise.per_sample(range(n), device))
            text = teacher.family != "classcond"
            groups = len(batches.prompts) if batches.prompts is not None else n if text else teacher.num_classes
            log.preview(done, vae.decode(teacher.vae, images), **condition_layout(groups, text, n))

        # Save state checkpoint; on SIGTERM/SIGINT (any rank) save and exit 0.
        stop = preempt.agreed(device, world)
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
                    + (f" | unreadable images skipped {len(real.bad)}" if real is not None else ""))
    else:
        log.message(f"{run_dir} already trained to step {start} (raise train.max_steps to continue)")
    log.close()
    return run_dir
