"""Data at the scale of real runs, measured on CPU with a tiny SD1.5-style teacher (issue: work at
the scale of real runs). Writes runs/bench-scale/results.json and prints one table:

- ``dmd2 prepare`` of N synthetic 32 px images with captions (default 100k) at 1 and 2 ranks:
  images/s (over the build, from prepare's own timing) and the 2-rank speed-up;
- ``dmd2 train``'s peak RSS with a 10k-image and an N-image cache (the cache is read memory-mapped
  by index, so it must not grow with the cache);
- time from ``dmd2 train`` start to the end of step 1 with a prepared cache vs without (the run
  that builds it first), on the 10k set.

Run it alone (``make bench-scale``): two cores shared with anything else change every figure.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from .common import child_env, cpu_env, load_average

OUT = Path("runs/bench-scale")
RSS_GROWTH_GOAL = 1.10  # peak RSS with the big cache at most this times the small cache's
PROMPTS = Path("recipes/data/tiny_prompts.txt")

# Runs a command and prints its peak RSS (KiB): the child's own ru_maxrss, nothing of this process.
_RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(rc)")


def make_images(folder: Path, n: int) -> None:
    """n seeded 32 px PNGs (a coloured rectangle on a coloured ground) and captions.jsonl; kept
    when already made."""
    import numpy as np
    from PIL import Image

    done = folder / "captions.jsonl"
    if done.is_file() and sum(1 for _ in done.open()) == n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    lines = []
    for i in range(n):
        bg, fg = rng.integers(0, 6, 2)
        x0, y0 = rng.integers(0, 20, 2)
        w, h = rng.integers(6, 12, 2)
        arr = np.full((32, 32, 3), 40 * bg, dtype=np.uint8)
        arr[y0:y0 + h, x0:x0 + w] = (255 - 40 * fg, 40 * fg, 128)
        name = f"{i:06d}.png"
        Image.fromarray(arr).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": f"a {colours[fg]} box on {colours[bg]}, number {i}"}))
    tmp = folder / "captions.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(done)


def subset(big: Path, folder: Path, n: int) -> None:
    """A folder whose captions.jsonl lists the first n images of ``big`` (no copies)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (big / "captions.jsonl").read_text().splitlines()[:n]
    rel = Path("..") / big.name
    out = [json.dumps({**json.loads(line), "file_name": str(rel / json.loads(line)["file_name"])}) for line in lines]
    (folder / "captions.jsonl").write_text("\n".join(out) + "\n")


def dmd2(*args, ranks: int = 1, cache: Path, rss: bool = False, port: int = 29811) -> tuple[float, str, int | None]:
    """(wall seconds, stdout + stderr, peak RSS in KiB when ``rss``) of one dmd2 command."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "dmd2", *map(str, args)]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port), "--module", "dmd2", *map(str, args)]
    if rss:
        cmd = [sys.executable, "-c", _RSS, *cmd]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=child_env(DMD2_CACHE_DIR=str(cache)), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args[:2]))} failed ({res.returncode}):\n{text[-3000:]}")
    found = re.search(r"maxrss_kib (\d+)", text)
    return wall, text, int(found.group(1)) if found else None


def build_seconds(text: str) -> float:
    """The build time prepare reports ("built N rows in S s"): all ranks' work, no process start-up."""
    return float(re.search(r"built \d+ rows in ([\d.]+) s", text).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=20, help="training steps of the RSS runs")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    cpu_env()
    out = a.out.resolve()
    for old in out.glob("cache_*"):  # every measurement builds from nothing
        subprocess.run(["rm", "-rf", str(old)], check=True)
    from dmd2.tiny import make_tiny_teacher

    teacher = out / "teacher"
    if not (teacher / "model_index.json").is_file():
        make_tiny_teacher("sd15", teacher)
    t0 = time.perf_counter()
    big, small = out / f"images_{a.images}", out / f"images_{a.small}"
    make_images(big, a.images)
    subset(big, small, a.small)
    print(f"{a.images} images ready in {time.perf_counter() - t0:.0f} s (load {load_average()})", flush=True)

    recipe = "recipes/tiny_sd15.yaml"
    common = [f"model.teacher={teacher}", f"data.prompts={PROMPTS.resolve()}", "loss.gan.enabled=true"]
    rows, info = [], {}
    rate = {}
    for ranks in (1, 2):
        wall, text, _ = dmd2("prepare", recipe, *common, f"data.real_images={big}", ranks=ranks,
                             cache=out / f"cache_{a.images}_r{ranks}")
        secs = build_seconds(text)
        rate[ranks] = a.images / secs
        rows.append({"name": f"prepare {a.images} images, {ranks} rank{'s' * (ranks > 1)}", "value": round(rate[ranks]),
                     "unit": "images/s", "detail": f"build {secs:.1f} s, command {wall:.1f} s"})
        print(rows[-1], flush=True)
    rows.append({"name": "prepare 2-rank speed-up", "value": round(rate[2] / rate[1], 2), "unit": "x", "goal": "> 1"})
    # the two caches hold the same files (the test suite checks bytes; here the listing)
    same = sorted(p.name for p in next((out / f"cache_{a.images}_r1").iterdir()).glob("*.safetensors")) == \
        sorted(p.name for p in next((out / f"cache_{a.images}_r2").iterdir()).glob("*.safetensors"))
    info["same_chunks_1_and_2_ranks"] = same

    small_cache = out / f"cache_{a.small}"
    dmd2("prepare", recipe, *common, f"data.real_images={small}", cache=small_cache)
    rss = {}
    for n, folder, cache in ((a.small, small, small_cache), (a.images, big, out / f"cache_{a.images}_r1")):
        run = out / f"train_{n}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        _, text, kib = dmd2("train", recipe, *common, f"data.real_images={folder}", f"output_dir={run}",
                            f"train.max_steps={a.steps}", f"train.checkpoint_every={a.steps}", "--quiet",
                            cache=cache, rss=True)
        rss[n] = kib / 1024
        rows.append({"name": f"train peak RSS, {n}-image cache", "value": round(rss[n]), "unit": "MiB",
                     "detail": f"{a.steps} steps, 1 rank"})
        print(rows[-1], flush=True)
    growth = rss[a.images] / rss[a.small]
    rows.append({"name": f"peak RSS {a.images} / {a.small} images", "value": round(growth, 3), "unit": "x",
                 "goal": f"<= {RSS_GROWTH_GOAL}", "met": growth <= RSS_GROWTH_GOAL})

    starts = {}
    for name, cache in (("prepared", small_cache), ("without prepare", out / f"cache_{a.small}_fresh")):
        run = out / f"start_{name.replace(' ', '_')}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        wall, text, _ = dmd2("train", recipe, *common, f"data.real_images={small}", f"output_dir={run}",
                             "train.max_steps=1", "train.checkpoint_every=1", cache=cache)
        starts[name] = wall
        rows.append({"name": f"train start to step 1 (and its checkpoint), {a.small} images, {name}",
                     "value": round(wall, 1), "unit": "s"})
        print(rows[-1], flush=True)
    rows.append({"name": "start to step 1 saved by prepare", "value": round(starts["without prepare"] - starts["prepared"], 1),
                 "unit": "s"})
    report = {"rows": rows, **info, "load_average_end": load_average(), "images": a.images, "small": a.small}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'measurement':<70} {'value':>10}  unit")
    for r in rows:
        print(f"{r['name']:<70} {r['value']:>10}  {r['unit']}  {r.get('goal', '')} {r.get('detail', '')}")
    print(f"\n{out / 'results.json'}")
    if not same or growth > RSS_GROWTH_GOAL:
        raise SystemExit(f"missed: same chunks {same}, RSS growth {growth:.3f} (goal <= {RSS_GROWTH_GOAL})")


if __name__ == "__main__":
    main()
