"""The multi-step experiment: train the 4-step digits student with recipe overrides and score it the
way `make demo` does (FID, precision/recall, label accuracy in the digits judges' feature space),
at all 4 timesteps, at its first 3 (a harmful last step shows), and at its checkpoint a quarter of
the way (degradation with training shows). One JSON line per variant in runs/multistep/results.jsonl.

    python -m benchmarks.multistep NAME [key.path=value ...] [--steps 500] [--num-images 1000]

Run it alone (each variant trains on one core); compare variants of one invocation's settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "runs" / "multistep"


def _dmd2(*args: str) -> None:
    from dmd2.engines import fresh_process_env

    env = fresh_process_env(OMP_NUM_THREADS=1, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", HF_HUB_OFFLINE=1)
    res = subprocess.run([sys.executable, "-m", "dmd2", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"dmd2 {' '.join(args[:2])} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


def _score(run: Path, paths, judge, timesteps: list[int], n: int, name: str) -> dict:
    images = OUT / "images" / name
    report = OUT / "images" / f"{name}.json"
    _dmd2("eval", str(run), "--fid", "--feature-extractor", str(paths.features), "--ref-dir",
          str(paths.data / "train"), "--num-images", str(n), "--timesteps", ",".join(map(str, timesteps)),
          "--images-dir", str(images), "--out", str(report))
    fid = {m["name"]: m["value"] for m in json.loads(report.read_text())["metrics"]}["fid"]
    row = judge.row(name, len(timesteps), images / "student", fid, n)
    return {"fid": round(fid, 3), "precision": round(row.precision, 3), "recall": round(row.recall, 3),
            "label_accuracy": round(row.label_accuracy, 3)}


def main(argv=None) -> None:
    from dmd2 import checkpoint
    from dmd2.digits.demo import prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--num-images", type=int, default=1000)
    args = ap.parse_intermixed_args(argv)
    paths = prepare(OUT, REPO / "runs" / "digits", train_teacher=False)
    run = OUT / "runs" / args.name
    shutil.rmtree(run, ignore_errors=True)
    quarter = args.steps // 4
    tic = time.time()
    _dmd2("train", str(REPO / "recipes" / "digits_4step.yaml"), f"output_dir={run}",
          f"model.teacher={paths.teacher}", f"data.real_images={paths.data / 'train'}",
          f"train.max_steps={args.steps}", f"train.checkpoint_every={quarter}", "train.keep_last=8", *args.overrides)
    train_s = time.time() - tic
    early = OUT / "runs" / f"{args.name}_quarter"
    shutil.rmtree(early, ignore_errors=True)
    shutil.copytree(run, early)
    for ckpt in checkpoint.committed(early):
        if checkpoint.read_state(ckpt)["step"] > quarter:
            shutil.rmtree(ckpt)
    from dmd2.digits.report import Judge

    judge = Judge(paths.features, paths.data / "train")
    ts = [999, 749, 499, 249]
    row = {"name": args.name, "overrides": args.overrides, "steps": args.steps, "train_s": round(train_s),
           "all4": _score(run, paths, judge, ts, args.num_images, args.name),
           "first3": _score(run, paths, judge, ts[:3], args.num_images, f"{args.name}_first3"),
           "quarter": _score(early, paths, judge, ts, args.num_images, f"{args.name}_quarter")}
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
