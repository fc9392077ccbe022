"""`make bench`: every ratio of the README's Performance table measured side by side on CPU with the
tiny models, printed with its goal and written to runs/bench/results.json as {name, value, goal, unit} rows.

    python -m benchmarks.cpu [--rounds N] [--only sampler,engine,cache,lora,scaling]

Variants of one measurement run in turns (A B C, C B A, ...) in the same process, or in alternating
processes where memory must be isolated; each ratio is the median of per-round ratios, so load
from other jobs on the machine hits both sides alike. Absolute times on a shared 2-core box are
inflated and noisy; the ratios are the result. The GPU side is benchmarks/gpu.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    OUT,
    Results,
    alternate,
    child_env,
    cpu_env,
    load_average,
    median,
    paired_ratio,
)

cpu_env()
os.environ.setdefault("DMD2_CACHE_DIR", str((OUT / "cond-cache").resolve()))

import torch  # noqa: E402

from benchmarks.rig import REPO, Rig, loss_config, own_teacher  # noqa: E402
from dmd2.config import DEFAULT_DS_CONFIG  # noqa: E402

torch.set_num_threads(1)
PROMPTS = ["a red circle", "blue stripes", "a green square on white", "a yellow dot"]


def tiny_teacher(family: str) -> Path:
    """A tiny random teacher in diffusers format, written once under runs/bench/."""
    from dmd2.tiny import make_tiny_teacher

    out = OUT / "teachers" / family
    if not (out / "model_index.json").is_file() and not (out / "unet").is_dir():
        make_tiny_teacher(family, out, seed=0)
    return out


# ---------------------------------------------------------------------------------------------


def bench_sampler(res: Results, rounds: int) -> None:
    """dmd2's sampler (what `dmd2 sample` draws with) vs the same UNet in a plain diffusers pipeline
    at K = 4 steps, and vs the teacher's own 50-step sampling (diffusers, CFG 1.75)."""
    from dmd2.config import Recipe
    from dmd2.export import distilled_scheduler
    from dmd2.generate import draw, teacher_draw
    from dmd2.models import load_teacher
    from dmd2.models.pipelines import diffusers_pipeline
    from dmd2.models.student import Student

    print("sampler: tiny SD1.5, 4 images per batch, K=4 vs diffusers LCM pipeline and teacher 50 steps", flush=True)
    src = tiny_teacher("sd15")
    parts = load_teacher(str(src))
    ts, n = [999, 749, 499, 249], 4
    recipe = Recipe.model_validate({"output_dir": "x", "model": {"teacher": str(src)}, "train": {"max_steps": 1},
                                    "generator": {"num_steps": len(ts), "timesteps": ts}})
    gen = Student(parts, recipe, None, str(src), "cpu")
    pipe = diffusers_pipeline(parts, distilled_scheduler(parts.scheduler_config, ts))
    seeds = list(range(n))

    def ours():
        return list(draw(gen, PROMPTS, seeds, ts, range(n), n))

    def diffusers_k():
        return pipe(PROMPTS, num_inference_steps=len(ts), timesteps=ts, guidance_scale=0.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    def teacher50():
        return list(teacher_draw(parts, PROMPTS, seeds, 50, range(n), n, cfg_scale=1.75, resolution=32, device="cpu"))

    with torch.no_grad():
        times = alternate({"ours": ours, "diffusers": diffusers_k, "teacher50": teacher50}, rounds)
    print(f"  median s/batch: ours {median(times['ours']):.4f} | diffusers {median(times['diffusers']):.4f} | "
          f"teacher 50 steps {median(times['teacher50']):.4f}", flush=True)
    res.add("sampler vs diffusers", paired_ratio(times, "diffusers", "ours"), ">= 0.95", "x diffusers throughput")
    speedup = paired_ratio(times, "teacher50", "ours")
    calls = 50 / len(ts)
    print(f"  speed-up over the teacher {speedup:.2f}x for {calls:.1f}x fewer UNet calls", flush=True)
    res.add("sampler vs teacher 50 steps", speedup / calls, ">= 0.9", "x of the 12.5x call ratio")


def _tiny_batch(teacher, n: int = 2):
    from dmd2.data import Batch
    from dmd2.models import Conditioner

    c = Conditioner(teacher, 32)
    lat = teacher.latent_size(32)
    g = torch.Generator().manual_seed(0)
    return Batch(cond=c.encode_prompts(PROMPTS[:n]), uncond=c.uncond(n),
                 real=torch.randn(n, teacher.channels, lat, lat, generator=g), real_cond=c.encode_prompts(PROMPTS[-n:]))


def bench_engines(res: Results, rounds: int) -> None:
    """One DMD2 iteration (generator + critic phase, tiny SD1.5, batch 2, GAN on) through the two
    DeepSpeed engines at ZeRO stage 1, 2 and 3 vs the same dmd2 functions on plain modules with
    torch AdamW, on 1 rank."""
    from dmd2 import engines
    from dmd2.models import load_teacher

    print("engine overhead: one iteration (critic + generator), tiny SD1.5, batch 2, 1 rank", flush=True)
    engines.init_distributed()
    base = load_teacher(str(tiny_teacher("sd15")))
    lat = base.latent_size(32)
    kw = dict(latent=lat, batch_size=2, timesteps=[999], loss_cfg=loss_config(1.75, (1e-3, 1e-2)))
    rigs = {"plain": Rig(own_teacher(base), **kw)}
    for stage in (1, 2, 3):
        cfg = engines.ds_config(DEFAULT_DS_CONFIG, batch_size=2, grad_clip=10.0, bf16=False,
                                zero_stage=stage)
        rigs[f"zero{stage}"] = Rig(own_teacher(base), ds={"generator": cfg, "critic": copy.deepcopy(cfg)}, **kw)
    batch = _tiny_batch(base)
    step = [0]

    def run(rig):
        step[0] += 1
        return rig.iteration(batch, k=0, seed=step[0])

    times = alternate({k: (lambda r=r: run(r)) for k, r in rigs.items()}, rounds, warmup=2)
    print("  median s/iteration: " + " | ".join(f"{k} {median(v):.4f}" for k, v in times.items()), flush=True)
    for stage in (1, 2, 3):
        res.add(f"engine overhead zero{stage}", paired_ratio(times, f"zero{stage}", "plain"), "<= 1.5",
                "x plain PyTorch time")


def bench_cache(res: Results, rounds: int) -> None:
    """The tiny SD1.5 recipe's iteration (batch + both phases through ZeRO-3), conditioning read from
    the cache vs encoded every step (prompts, captions, real images loaded and VAE-encoded)."""
    from dmd2 import engines
    from dmd2.config import load_recipe
    from dmd2.data import build_batches
    from dmd2.models import load_teacher

    print("conditioning cache: tiny SD1.5 recipe (GAN on, batch 2), ZeRO-3, cache vs per-step encoding", flush=True)
    engines.init_distributed()
    args = [f"model.teacher={tiny_teacher('sd15')}", "output_dir=runs/bench/cache-run"]
    setups = {}
    for name, cache in (("cached", "true"), ("encoded", "false")):
        recipe = load_recipe(REPO / "recipes/tiny_sd15.yaml", [*args, f"data.cache={cache}"])
        teacher = load_teacher(recipe.model.teacher)
        setups[name] = build_batches(recipe.data, teacher, resolution=teacher.resolution, batch_size=2, seed=0,
                                     cfg_scale=recipe.loss.cfg_scale, rank=0, world=1, device="cpu")
    cfg = engines.ds_config(DEFAULT_DS_CONFIG, batch_size=2, grad_clip=10.0, bf16=False, zero_stage=3)
    rig = Rig(own_teacher(teacher), latent=setups["cached"].shape[-1], batch_size=2,
              timesteps=recipe.generator.resolved_timesteps(), loss_cfg=recipe.loss,
              ds={"generator": cfg, "critic": copy.deepcopy(cfg)})
    step = [0]

    def iteration(setup):
        step[0] += 1
        batch = setup(step[0], torch.Generator().manual_seed(step[0]))
        return rig.iteration(batch, k=0, seed=step[0])

    def batch_only(setup):
        step[0] += 1
        return setup(step[0], torch.Generator().manual_seed(step[0]))

    times = alternate({k: (lambda v=v: iteration(v)) for k, v in setups.items()}, rounds, warmup=1)
    btimes = alternate({k: (lambda v=v: batch_only(v)) for k, v in setups.items()}, rounds, warmup=1)
    print(f"  median s/iteration: cached {median(times['cached']):.4f} | encoded {median(times['encoded']):.4f}; "
          f"conditioning alone: cached {median(btimes['cached']) * 1e3:.2f} ms | "
          f"encoded {median(btimes['encoded']) * 1e3:.2f} ms", flush=True)
    res.add("conditioning cache", paired_ratio(times, "cached", "encoded"), "< 1", "x iteration time")
    res.add("conditioning cache (batch only)", paired_ratio(btimes, "cached", "encoded"), "< 1",
            "x conditioning time per step")


def bench_lora(res: Results, rounds: int) -> None:
    """Generator LoRA (and LoRA generator + LoRA fake score on the teacher's base) vs full
    fine-tuning, ZeRO-3, same batch, a 21M-parameter SD1.5-shaped UNet at 128 px, rank 16. Time: the
    three modes built in one process, iterations alternating. Memory: one process per mode (peak
    resident memory above the process's baseline once the libraries are loaded)."""
    from benchmarks.rig import lora_config, make_unet, random_batch, synthetic_teacher
    from dmd2 import engines

    print("lora vs full: small SD1.5-shaped UNet (21M), 128 px, batch 2, ZeRO-3, rank 16", flush=True)
    modes = ["full", "lora", "lora+fake"]
    mem: dict[str, dict] = {}
    tmp = OUT / ".lora"
    tmp.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        cfg = {"name": "small-sd15", "mode": mode, "offload": False, "batch": 2, "iters": 2, "warmup": 1,
               "device": "cpu", "lora_rank": 16}
        out = tmp / f"{mode}.json"
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu.py"), "--worker", json.dumps(cfg),
                               "--device", "cpu", "--result", str(out)], capture_output=True, text=True,
                              env=child_env())
        if proc.returncode != 0:
            raise RuntimeError(f"lora worker {mode} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        mem[mode] = json.loads(out.read_text())

    engines.init_distributed()
    cfg = engines.ds_config(DEFAULT_DS_CONFIG, batch_size=2, grad_clip=10.0, bf16=False, zero_stage=3)
    rigs = {m: Rig(synthetic_teacher("small-sd15", make_unet("small-sd15")), latent=16, batch_size=2,
                   timesteps=[999], loss_cfg=loss_config(1.75, (1e-3, 1e-2)), lora=lora_config(m, 16),
                   ds={"generator": copy.deepcopy(cfg), "critic": copy.deepcopy(cfg)}) for m in modes}
    batch = random_batch("small-sd15", 2, 16, "cpu")
    step = [0]

    def run(rig):
        step[0] += 1
        return rig.iteration(batch, k=0, seed=step[0])

    times = alternate({m: (lambda r=r: run(r)) for m, r in rigs.items()}, rounds)
    for m in modes:
        z = mem[m]
        print(f"  {m:<9} median {median(times[m]):.3f} s/it | peak {z['peak_gb'] * 1024:.0f} MiB | trainable "
              f"{z['generator_trainable'] + z['critic_trainable']:,} | fp32 master "
              f"{z['generator_fp32_master'] + z['critic_fp32_master']:,}", flush=True)
    for m in ("lora", "lora+fake"):
        res.add(f"{m} vs full memory", mem[m]["peak_gb"] / mem["full"]["peak_gb"], "<= 0.6", "x peak memory (CPU RSS)")
        res.add(f"{m} vs full time", paired_ratio(times, m, "full"), "<= 0.9", "x iteration time")
    z = mem["lora"]
    res.add("zero3 fp32 master vs trainable (lora)",
            (z["generator_fp32_master"] + z["critic_fp32_master"]) / (z["generator_trainable"] + z["critic_trainable"]),
            "<= 1.01", "x trainable parameters")


def bench_scaling(res: Results, rounds: int) -> None:
    """`dmd2 train` on the tiny SD1.5 recipe (both phases every step, batch 2 per rank) at 1 rank and
    at 2 ranks through the deepspeed launcher (ZeRO-3 across ranks, gloo); median step time of
    steps 3-8, launches alternating."""
    print("scaling: dmd2 train, tiny SD1.5, batch 2 per rank, ZeRO-3; 1 rank vs 2 ranks (deepspeed launcher)",
          flush=True)
    teacher = tiny_teacher("sd15")
    steps: dict[int, list[float]] = {1: [], 2: []}
    per_round = []
    for r in range(rounds):
        medians = {}
        for ranks in (1, 2) if r % 2 == 0 else (2, 1):
            run = OUT / "scaling" / f"r{ranks}-{r}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            args = ["train", "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", f"output_dir={run}",
                    "train.max_steps=8", "train.update_ratio=1", "train.checkpoint_every=1000", "logging.log_every=100"]
            if ranks == 1:
                cmd = [sys.executable, "-m", "dmd2", *args]
            else:
                port = 29500 + os.getpid() % 1000 + r
                cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
                       "--module", "dmd2", *args]
            proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"train at {ranks} ranks failed: {proc.stderr[-3000:]}")
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            t = [row["step_time_s"] for row in rows if row["step"] >= 3]
            steps[ranks] += t
            medians[ranks] = median(t)
        per_round.append(medians[2] / medians[1])
    print(f"  median s/step: 1 rank {median(steps[1]):.3f} | 2 ranks {median(steps[2]):.3f} "
          f"(2 ranks on 2 shared cores: {2 / median(per_round):.2f}x the images/s of 1 rank)", flush=True)
    res.add("2 ranks vs 1", median(per_round), None, "x step time (same batch per rank)")


SECTIONS = {"sampler": bench_sampler, "engine": bench_engines, "cache": bench_cache, "lora": bench_lora,
            "scaling": bench_scaling}
ROUNDS = {"sampler": 9, "engine": 9, "cache": 31, "lora": 5, "scaling": 2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ",".join(SECTIONS))
    p.add_argument("--rounds", type=int, default=None, help="rounds per measurement (default: per section)")
    args = p.parse_args(argv)
    res = Results(OUT / "results.json")
    t0 = time.time()
    load = [load_average()]
    print(f"dmd2 benchmarks on CPU | load average {load[0]} | torch threads {torch.get_num_threads()}", flush=True)
    for name in args.only.split(","):
        SECTIONS[name](res, args.rounds or ROUNDS[name])
        load.append(load_average())
        res.write()
    print(f"\n{res.table()}\n\nload average (1/5/15 min) at start and after each section: {' ; '.join(load)}")
    print(f"wrote {res.path} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
