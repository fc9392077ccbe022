"""SD1.5-, SDXL-, SD3.5-Medium- and FLUX.1-dev-architecture DMD2 iterations on one GPU: ZeRO-3, bf16,
activation checkpointing.

    python benchmarks/gpu.py                          # on a GPU box: 7 minutes (--budget-s), runs/bench/gpu.json
    python benchmarks/gpu.py --tiny --device cpu      # smoke run of the same code on CPU (tiny denoisers)

For each architecture (SD1.5 at 512 px, 1-step, CFG 1.75; SDXL at 1024 px, 4-step with backward
simulation, CFG 8; SD3.5-Medium at 1024 px, 4-step, CFG 4; FLUX.1-dev at 1024 px, 4-step, its
guidance input 3.5; all with the GAN head), each training mode (full fine-tuning, LoRA generator,
LoRA generator + LoRA fake score sharing the teacher's base; FLUX, ~12B parameters, only the last:
two full copies with fp32 Adam state would need ~380 GB) and optimizer state on the GPU or
offloaded to the CPU (the shipped zero3_offload template): iteration time (generator phase + critic
phase), images/s, peak memory (torch.cuda.max_memory_allocated) and model FLOPs utilisation.
Denoisers are built from their diffusers configs with random weights (nothing is downloaded); text
encoders and VAE are left out (random embeddings and latents of the right shapes).

FLOPs are counted once per configuration on the meta device (torch FlopCounterMode, in a CPU
process running beside the GPU work): every UNet and GAN-head call of one iteration, forward and
backward, averaged over the backward-simulation index k, excluding activation-checkpoint
recomputation; MFU = FLOPs / iteration time / the GPU's dense bf16 peak (a table keyed on the
device name, or --peak-tflops).

Each configuration runs in its own process (exact peak memory; an out-of-memory error is recorded
and the next one runs); results are written after each, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Results, child_env, verdict  # noqa: E402
from dmd2.config import ds_template  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s), most specific name first.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("L4", 121.0),
               ("RTX 4090", 165.0), ("RTX A6000", 155.0), ("A6000", 155.0)]
MODES = ("full", "lora", "lora+fake")
GIB = 1024**3


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def versions() -> dict:
    """The versions a figure depends on (a GPU box often has its own torch and transformers)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "deepspeed", "diffusers", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def plan(args) -> list[dict]:
    """Configurations in priority order (the LoRA goals at SD1.5 size, SDXL fitting in 80 GB, the
    flow-matching transformers, then the rest)."""
    sd, xl, s3, fx = (f"tiny-{a}" if args.tiny else a for a in ("sd15", "sdxl", "sd35", "flux"))
    out = []
    for name, mode, offload in [(sd, "full", False), (sd, "lora", False), (sd, "lora+fake", False),
                                (sd, "encode", False), (xl, "full", False), (xl, "lora+fake", False),
                                (s3, "full", False), (s3, "lora+fake", False), (fx, "lora+fake", False),
                                (xl, "full", True), (xl, "encode", False), (xl, "lora", False), (sd, "full", True),
                                (sd, "lora+fake", True), (xl, "lora+fake", True), (s3, "full", True)]:
        arch = name.removeprefix("tiny-")
        if arch in args.models and (mode in args.modes or mode == "encode") and offload in args.offload:
            out.append({"name": name, "mode": mode, "offload": offload, "batch": getattr(args, f"batch_{arch}"),
                        "iters": args.iters, "warmup": args.warmup, "device": args.device,
                        "lora_rank": args.lora_rank})
    return out


# ---------------------------------------------------------------------------------------------
# One configuration (a separate process)


def run_config(cfg: dict) -> dict:
    import torch

    from benchmarks.rig import (
        Rig,
        lora_config,
        loss_config,
        make_unet,
        random_batch,
        recipe_of,
        rss_peak,
        rss_peak_reset,
        synthetic_teacher,
        zero_state_counts,
    )
    from dmd2 import engines

    engines.init_distributed()
    dev = engines.device() if cfg["device"] != "cpu" else torch.device("cpu")
    cuda = dev.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    r = recipe_of(cfg["name"])
    latent, K, B = r["resolution"] // 8, len(r["timesteps"]), cfg["batch"]
    import deepspeed  # noqa: F401  (libraries loaded before the memory baseline)
    import diffusers.models.unets.unet_2d_condition  # noqa: F401
    import peft  # noqa: F401

    import dmd2.models.roles  # noqa: F401

    base = rss_peak_reset()

    def peak() -> float:
        return (torch.cuda.max_memory_allocated() if cuda else rss_peak() - base) / GIB

    out = {**cfg, "resolution": r["resolution"], "steps": K, "bf16": bf16}
    if cfg["mode"] == "encode":
        return {**out, **encode_cost(cfg, dev, r["resolution"])}
    try:
        t0 = time.perf_counter()
        teacher = synthetic_teacher(cfg["name"], make_unet(cfg["name"], device=dev,
                                                           dtype=torch.bfloat16 if bf16 else torch.float32), latent)
        template = ds_template("zero3_offload" if cfg["offload"] else "zero3")
        ds = {o: engines.ds_config(template, batch_size=B, grad_clip=10.0, bf16=bf16, zero_stage=3)
              for o in ("generator", "critic")}
        rig = Rig(teacher, latent=latent, batch_size=B, timesteps=r["timesteps"],
                  loss_cfg=loss_config(r["cfg"], r["gan"]), lora=lora_config(cfg["mode"], cfg["lora_rank"]),
                  ds=ds, device=dev)
        batch = random_batch(cfg["name"], B, latent, dev)
        out.update(build_s=round(time.perf_counter() - t0, 1), build_peak_gb=round(peak(), 2),
                   **zero_state_counts(rig))

        def timed(k, seed, generator_turn=True):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            losses = rig.iteration(batch, k=k, seed=seed, generator_turn=generator_turn)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t, losses

        # Warm-up: the first is the longest k (most backward-simulation calls; ZeRO-3 traces its
        # module order here). On an H200 one warm-up iteration was not enough: the next two still
        # took 2-4x the steady time (SD1.5 9.7, 5.2, then 2.2-2.9 s; SDXL 21, 27, then 6.7-8.6 s),
        # so the mean over three timed iterations read 1.5-2x slow. Hence several, cycling k.
        w = cfg["warmup"]
        warm = [timed((K - 1 - i) % K, i)[0] for i in range(w)]
        n = max(cfg["iters"], K) if K > 1 else cfg["iters"]
        times, losses = [], {}
        for i in range(n):  # k cycles over 0..K-1: the mean is the expected time under uniform k
            dt, losses = timed(i % K, w + i)
            times.append(dt)
        critic_only, _ = timed(0, w + n, generator_turn=False)
        it = sum(times) / len(times)
        out.update(status="ok", warmup_s=[round(t, 3) for t in warm], iter_s=round(it, 4),
                   iter_times_s=[round(t, 4) for t in times],
                   critic_only_s=round(critic_only, 4), images_per_s=round(B / it, 3), peak_gb=round(peak(), 3),
                   losses={k: round(v, 5) for k, v in losses.items()})
        if cuda:
            out["reserved_gb"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError) as e:
        out.update(status="oom", peak_gb=round(peak(), 3), error=str(e).strip().splitlines()[0][:300])
    return out


def encode_cost(cfg: dict, dev, resolution: int) -> dict:
    """What the cache saves per step: loading and resizing the batch's real images (a 640x480 JPEG
    each, in the training process as train.py does), VAE-encoding them and encoding the prompts and
    captions with the text encoders, at the recipe's resolution and batch."""
    import tempfile

    import torch
    from PIL import Image

    from benchmarks.rig import make_encoders
    from dmd2.data import _load_image

    B = cfg["batch"]
    vae, texts = make_encoders(cfg["name"], dev)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/img.jpg"
        Image.effect_noise((640, 480), 64).convert("RGB").save(path, quality=90)
        ids = torch.randint(0, 49408, (2 * B, 77), device=dev)  # the batch's prompts and real captions

        def once():
            t0 = time.perf_counter()
            images = torch.stack([_load_image(path, resolution) for _ in range(B)]).to(dev)
            t1 = time.perf_counter()
            with torch.no_grad():
                vae.encode(images).latent_dist.mode()
                for enc in texts:
                    enc(ids, output_hidden_states=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return t1 - t0, time.perf_counter() - t1

        once()
        runs = [once() for _ in range(3)]
    load = sorted(r[0] for r in runs)[1]
    encode = sorted(r[1] for r in runs)[1]
    return {"status": "ok", "load_s": round(load, 4), "encode_s": round(encode, 4)}


def count_flops(names: list[str], modes: list[str], lora_rank: int) -> dict:
    """FLOPs of one iteration at batch 1 for k = 0 and 1 (they grow by one generator call per k)."""
    from benchmarks.rig import loss_config, model_flops, recipe_of

    out = {}
    for name in names:
        r = recipe_of(name)
        for mode in modes:
            ks = [0, 1] if len(r["timesteps"]) > 1 else [0]
            out[f"{name}|{mode}"] = [model_flops(name, lora_mode=mode, batch_size=1, latent=r["resolution"] // 8,
                                                 timesteps=r["timesteps"], loss_cfg=loss_config(r["cfg"], r["gan"]), k=k,
                                                 lora_rank=lora_rank)
                                     for k in ks]
    return out


def mean_flops(per_k: list[int], K: int, batch: int) -> float:
    """Mean over k in 0..K-1 of the iteration's FLOPs, at ``batch`` (FLOPs are linear in batch)."""
    if len(per_k) == 1:
        return per_k[0] * batch
    return (per_k[0] + (K - 1) / 2 * (per_k[1] - per_k[0])) * batch


# ---------------------------------------------------------------------------------------------
# The orchestrator


def _child(args_list: list[str], timeout: float, env: dict) -> tuple[int | None, str]:
    proc = subprocess.Popen([sys.executable, __file__, *args_list], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
        return proc.returncode, text
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        text, _ = proc.communicate()
        return None, text


def summarise(configs: list[dict], device: str, peak: float | None) -> Results:
    """Rows {name, value, goal, unit} from the measured configurations."""
    res = Results(Path(os.devnull), echo=False)
    by = {(c["name"].removeprefix("tiny-"), c["mode"], c["offload"]): c for c in configs if c.get("status") == "ok"}
    for arch in ("sd15", "sdxl"):
        full = by.get((arch, "full", False))
        for mode in ("lora", "lora+fake"):
            lo = by.get((arch, mode, False))
            if full and lo:
                res.add(f"{mode} vs full memory ({arch})", lo["peak_gb"] / full["peak_gb"],
                        "<= 0.6" if arch == "sd15" else None, "x peak memory")
                res.add(f"{mode} vs full time ({arch})", lo["iter_s"] / full["iter_s"],
                        "<= 0.9" if arch == "sd15" else None, "x iteration time")
        enc = by.get((arch, "encode", False))
        if full and enc:  # cached: the iteration alone; encoded: plus loading and encoding the batch
            res.add(f"conditioning cache ({arch})", full["iter_s"] / (full["iter_s"] + enc["load_s"] + enc["encode_s"]),
                    "< 1", "x iteration time")
    for c in configs:  # the whole 4-step iteration (teacher, generator, fake score, GAN head) on one GPU
        arch = c["name"].removeprefix("tiny-")
        if arch != "sd15" and c["mode"] != "encode" and not c["status"].startswith("skipped"):
            what = f"{c['mode']}{', optimizer offload' if c['offload'] else ''}, batch {c['batch']}"
            res.add(f"{arch} 4-step peak memory ({what})", c.get("peak_gb") if c["status"] == "ok" else None,
                    "<= 80" if arch == "sdxl" else None, "GB" if c["status"] == "ok" else f"GB ({c['status']})")
    for c in configs:
        if c.get("mfu") is not None:
            res.add(f"mfu {c['name']} {c['mode']}{' offload' if c['offload'] else ''}", c["mfu"], None,
                    f"of {peak:g} TFLOP/s bf16")
    return res


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench/gpu.json")
    p.add_argument("--tiny", action="store_true", help="tiny denoisers of the same kinds (smoke run)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--models", default="sd15,sdxl,sd35,flux")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--offload", default="off,on", help="optimizer state on the GPU (off) and/or CPU (on)")
    p.add_argument("--batch-sd15", type=int, default=8)
    p.add_argument("--batch-sdxl", type=int, default=1)
    p.add_argument("--batch-sd35", type=int, default=1)
    p.add_argument("--batch-flux", type=int, default=1)
    p.add_argument("--iters", type=int, default=4, help="timed iterations (at least one per k for SDXL 4-step)")
    p.add_argument("--warmup", type=_at_least_one, default=3, metavar="N",
                   help="untimed iterations first, at least 1 (ZeRO-3 traces on the first; k cycles from the longest)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (else a table)")
    p.add_argument("--budget-s", type=float, default=420, help="stop starting configurations after this")
    p.add_argument("--config-timeout-s", type=float, default=240)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker or args.count_flops:
        if args.device == "cpu" or args.count_flops:
            from benchmarks.common import cpu_env

            cpu_env()
        out = run_config(json.loads(args.worker)) if args.worker else count_flops(
            args.models.split(","), args.modes.split(","), args.lora_rank)
        Path(args.result).write_text(json.dumps(out))
        return 0

    import torch

    start = time.time()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.models = args.models.split(",")
    args.modes = args.modes.split(",")
    args.offload = [{"off": False, "on": True}[o] for o in args.offload.split(",")]
    if args.tiny:  # tiny UNets have 32-64 channels: rank 64 adapters would dwarf them
        args.batch_sd15 = 2 if args.batch_sd15 == 8 else args.batch_sd15
        args.lora_rank = 4 if args.lora_rank == 64 else args.lora_rank
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(device) if args.device == "cuda" else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.stem}-tmp"
    tmp.mkdir(exist_ok=True)
    env = child_env(PYTHONUNBUFFERED=1)
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR="cpu")
    else:  # DeepSpeed on the GPU; the CPU optimizer (offload) gets the cores the FLOP counter leaves
        env.pop("DS_ACCELERATOR", None)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) - 1))
    report = {"device": device, "peak_tflops_bf16": peak, "command": " ".join(sys.argv),
              "versions": versions(), "configs": [], "rows": []}

    # FLOPs: a CPU process beside the GPU work
    names = sorted({c["name"] for c in plan(args)})
    flops_file = tmp / "flops.json"
    flops_proc = subprocess.Popen([sys.executable, __file__, "--count-flops", "--models", ",".join(names),
                                   "--modes", ",".join(args.modes), "--lora-rank", str(args.lora_rank),
                                   "--result", str(flops_file)],
                                  env={**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)

    def write():
        out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"device: {device} | peak bf16: {peak} TFLOP/s | budget {args.budget_s:.0f} s", flush=True)
    for cfg in plan(args):
        left = args.budget_s - (time.time() - start)
        label = f"{cfg['name']:<9} {cfg['mode']:<9} offload={'on ' if cfg['offload'] else 'off'} batch={cfg['batch']}"
        if left < 30:
            report["configs"].append({**cfg, "status": "skipped (time budget)"})
            print(f"{label}: skipped (time budget)", flush=True)
            continue
        result_file = tmp / "config.json"
        result_file.unlink(missing_ok=True)
        rc, text = _child(["--worker", json.dumps(cfg), "--result", str(result_file)],
                          min(args.config_timeout_s, left), env)
        if rc == 0 and result_file.is_file():
            row = json.loads(result_file.read_text())
        else:
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            oom = "out of memory" in text.lower()
            row = {**cfg, "status": "timeout" if rc is None else ("oom" if oom else "error"),
                   "error": lines[-1][:300] if lines else ""}
        report["configs"].append(row)
        write()
        if row["status"] == "ok" and cfg["mode"] == "encode":
            print(f"{label}: per step, loading images {row['load_s']:.3f} s, encoding {row['encode_s']:.3f} s", flush=True)
        elif row["status"] == "ok":
            print(f"{label}: {row['iter_s']:.3f} s/it  {row['images_per_s']:.2f} img/s  peak {row['peak_gb']:.2f} GB"
                  f"  (build {row['build_s']} s)", flush=True)
        else:
            print(f"{label}: {row['status']} {row.get('error', '')[:160]}", flush=True)

    # MFU, once the FLOPs are in (they are not needed for anything else)
    try:
        flops_proc.wait(timeout=max(5.0, args.budget_s + 20 - (time.time() - start)))
        flops = json.loads(flops_file.read_text())
    except (subprocess.TimeoutExpired, OSError, json.JSONDecodeError):
        os.killpg(flops_proc.pid, 9)
        flops = {}
        report["flops_note"] = "FLOP count did not finish in time; MFU not reported"
    for c in report["configs"]:
        per_k = flops.get(f"{c['name']}|{c['mode']}")
        if c.get("status") == "ok" and per_k:
            c["tflops_per_iter"] = float(f"{mean_flops(per_k, c['steps'], c['batch']) / 1e12:.4g}")
            c["achieved_tflops"] = float(f"{c['tflops_per_iter'] / c['iter_s']:.4g}")
            c["mfu"] = round(c["achieved_tflops"] / peak, 4) if peak else None
    res = summarise(report["configs"], device, peak)
    report["rows"] = res.rows
    report["total_s"] = round(time.time() - start, 1)
    write()
    print(f"\n{'config':<40} {'s/it':>8} {'img/s':>7} {'peak GB':>8} {'TFLOP/it':>9} {'MFU':>6}")
    for c in report["configs"]:
        label = f"{c['name']} {c['mode']} offload={'on' if c['offload'] else 'off'} b={c['batch']}"
        if c.get("status") == "ok" and c["mode"] == "encode":
            print(f"{label:<40} load {c['load_s']:.3f} s + encode {c['encode_s']:.3f} s per step")
        elif c.get("status") == "ok":
            mfu = f"{c['mfu']:.3f}" if c.get("mfu") is not None else "-"
            print(f"{label:<40} {c['iter_s']:>8.3f} {c['images_per_s']:>7.2f} {c['peak_gb']:>8.2f} "
                  f"{c.get('tflops_per_iter', float('nan')):>9.3g} {mfu:>6}")
        else:
            print(f"{label:<40} {c['status']}")
    for r in res.rows:
        print(f"{r['name']:<40} {r['value']!s:>8} {r['unit']:<30} goal {r['goal'] or '-':<7} {verdict(r)}")
    print(f"wrote {out} ({report['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
