"""The multi-step experiment: train a digits student (default the 4-step class-conditional one;
``--recipe recipes/digits_t2i_4step.yaml`` for digits-t2i, ``recipes/digits_flow_4step.yaml`` for
digits-flow) with recipe overrides and score it the
way `make demo` does (FID, precision/recall, label accuracy in the digits judges' feature space;
digits-t2i and digits-flow images reduced to 8 x 8 first), at all its timesteps, at all but the last (a harmful last
step shows), and at its checkpoint a quarter of the way (degradation with training shows). One
JSON line per variant in runs/multistep/results.jsonl.

    python -m benchmarks.multistep NAME [key.path=value ...] [--recipe R] [--steps 500] [--num-images 1000]

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


def _score(run: Path, paths, judge, timesteps: list[int] | None, n: int, name: str, bench: str) -> dict:
    from dmd2.digits import t2i as digits_t2i
    from dmd2.digits.report import DIGITS

    images = OUT / "images" / name
    report = OUT / "images" / f"{name}.json"
    extra = ["--timesteps", ",".join(map(str, timesteps))] if timesteps else []
    if bench != DIGITS:  # image i: prompt i mod 60, whose digit is i mod 10 (all_prompts' order)
        extra += ["--prompts-file", str(digits_t2i.PROMPTS_FILE)]
    _dmd2("eval", str(run), "--fid", "--feature-extractor", str(paths.features), "--ref-dir",
          str(paths.data / "train"), "--num-images", str(n), *extra,
          "--images-dir", str(images), "--out", str(report))
    rep = json.loads(report.read_text())
    fid = {m["name"]: m["value"] for m in rep["metrics"]}["fid"]
    row, _ = judge.score(name, len(rep["protocol"]["timesteps"]), images / "student", fid, n, bench)
    return {"fid": round(row.fid, 3), "precision": round(row.precision, 3), "recall": round(row.recall, 3),
            "label_accuracy": round(row.label_accuracy, 3)}


def main(argv=None) -> None:
    from dmd2.digits.demo import prepare, quarter_copy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--recipe", default="recipes/digits_4step.yaml")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--num-images", type=int, default=1000)
    args = ap.parse_intermixed_args(argv)
    paths = prepare(OUT, REPO / "runs" / "digits", train_teacher=False)
    from dmd2.digits.report import DIGITS, FLOW, T2I

    name = Path(args.recipe).name
    bench = T2I if "t2i" in name else FLOW if "flow" in name else DIGITS
    if bench != DIGITS:
        from dmd2.digits.t2i import write_captioned_digits

        real = write_captioned_digits(REPO / "runs" / "digits" / "t2i_data")
        data_args = [f"data.real_images={real}"]
    else:
        data_args = [f"model.teacher={paths.teacher}", f"data.real_images={paths.data / 'train'}"]
    run = OUT / "runs" / args.name
    shutil.rmtree(run, ignore_errors=True)
    quarter = args.steps // 4
    tic = time.time()
    _dmd2("train", str(REPO / args.recipe), f"output_dir={run}", *data_args,
          f"train.max_steps={args.steps}", f"train.checkpoint_every={quarter}", "train.keep_last=8", *args.overrides)
    train_s = time.time() - tic
    early = quarter_copy(run, quarter)
    from dmd2.digits.report import Judge

    judge = Judge(paths.features, paths.data / "train")
    from dmd2.config import load_recipe

    recipe = load_recipe(REPO / args.recipe)
    row = {"name": args.name, "recipe": args.recipe, "overrides": args.overrides, "steps": args.steps,
           "train_s": round(train_s), "all4": _score(run, paths, judge, None, args.num_images, args.name, bench)}
    if recipe.generator.num_steps > 1:
        ts = json.loads((OUT / "images" / f"{args.name}.json").read_text())["protocol"]["timesteps"]
        row["first3"] = _score(run, paths, judge, ts[:-1], args.num_images, f"{args.name}_first3", bench)
    row["quarter"] = _score(early, paths, judge, None, args.num_images, f"{args.name}_quarter", bench)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
