"""``make demo`` and ``make bench-quality``: distill the digits teacher on CPU and compare the
students with the teacher at equal network calls, in one table.

    python -m dmd2.digits.demo            # make demo: under 10 minutes on 2 idle CPU cores
    python -m dmd2.digits.demo --bench    # make bench-quality: longer training, more samples

1. Data, teacher, judges: the digits as class folders (``runs/digits/data``), the checked-in
   teacher (``recipes/data/digits_teacher``; ``--train-teacher`` retrains it with
   ``dmd2.digits.teacher`` into a cache), the feature extractor (cached under ``runs/digits/``,
   keyed by a hash of its settings) and the label classifier.
2. ``dmd2 train`` for each student recipe, the same command and code path as SDXL; two runs at a
   time (one per core).
3. ``dmd2 eval --fid --teacher`` per student, which keeps its images; precision/recall and label
   accuracy are computed here from those same images, in the same feature space as FID.
4. ``dmd2 sample`` grids, ``<out>/report.json`` (one row per sampler) and the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import Split, write_digits
from .report import Judge, Row, check_targets, comparison_grid, measure_speed, table

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN_TEACHER = REPO / "recipes" / "data" / "digits_teacher"
CACHE = Path("runs") / "digits"  # data, retrained teacher, feature extractor
CLASSIFIER_VERSION = 1  # bump when classifiers.py changes what it trains


@dataclass(frozen=True)
class Student:
    name: str
    recipe: str  # relative to the repository
    max_steps: int | None = None  # None: the recipe's own
    overrides: tuple[str, ...] = ()  # key.path=value, as on the dmd2 command line


@dataclass(frozen=True)
class Profile:
    out: str
    students: tuple[Student, ...]
    teacher_steps: tuple[int, ...]  # network calls of the teacher rows
    num_images: int  # per sampler, classes evenly
    targets: str  # which quality targets are checked: demo, bench or test
    grid_images: int = 100


PROFILES = {
    "demo": Profile("runs/demo", (Student("student_1step", "recipes/digits_1step.yaml"),
                                  Student("student_4step", "recipes/digits_4step.yaml")), (1, 4, 50), 1000, "demo"),
    # The 1-step student at batch 256 for 1500 steps (the compute of 3000 at the recipe's 128):
    # FID 0.94 vs 1.39 at n=2000 (the teacher at 50 calls: 1.09; README, make bench-quality).
    "bench": Profile("runs/bench-quality", (Student("student_1step", "recipes/digits_1step.yaml", 1500,
                                                    ("train.batch_size=256",)),
                                            Student("student_4step", "recipes/digits_4step.yaml", 2000)),
                     (1, 4, 50), 2000, "bench"),
    # tests/test_digits.py: the 1-step student only, briefly trained, against the 1-call teacher.
    # 150 steps need the faster constant rates of the recipe's first version (at the recipe's own
    # 1e-4/3e-4 cosine the student is at FID 43 after 150 steps, 0.65x the teacher's).
    "test": Profile("runs/demo-test", (Student("student_1step", "recipes/digits_1step.yaml", 150, (
        "optim.generator.lr=3e-4", "optim.critic.lr=1e-3", "optim.generator.schedule=constant",
        "optim.critic.schedule=constant", "train.batch_size=64")),), (1,), 300, "test", grid_images=20),
}


@dataclass
class Paths:
    out: Path
    data: Path
    teacher: Path
    features: Path
    runs: dict[str, Path] = field(default_factory=dict)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Data, teacher, judges


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def prepare(out: Path, cache: Path, train_teacher: bool) -> Paths:
    import numpy as np

    from . import classifiers
    from .data import read_class_folders

    data = write_digits(cache / "data", Split())
    if train_teacher:
        from .teacher import TeacherSettings
        from .teacher import train_teacher as run_teacher

        s = TeacherSettings()
        teacher = cache / f"teacher-{s.digest()}"
        if not (teacher / "digits_teacher.json").is_file():
            _say(f"training the teacher into {teacher} (dmd2.digits.teacher, ~15 min on one idle core)")
            run_teacher(teacher.with_name(teacher.name + ".tmp"), s)
            shutil.rmtree(teacher, ignore_errors=True)
            teacher.with_name(teacher.name + ".tmp").rename(teacher)
    else:
        teacher = CHECKED_IN_TEACHER
    settings = {"split": asdict(Split()), "version": CLASSIFIER_VERSION, "epochs": 40, "seed": 0}
    features = cache / f"features-{_digest(settings)}" / "features.pt"
    if not features.is_file():
        _say("training the feature extractor on the training split (~20 s)")
        train, heldout = read_class_folders(data / "train"), read_class_folders(data / "heldout")
        tmp = classifiers.train_feature_extractor(train, heldout, features.with_name("features.tmp.pt"),
                                                  epochs=settings["epochs"], seed=settings["seed"])
        tmp.with_suffix(".json").replace(features.with_suffix(".json"))
        tmp.replace(features)
    acc = json.loads(features.with_suffix(".json").read_text())["heldout_accuracy"]
    _say(f"data {data} | teacher {teacher} | feature extractor {features} (held-out accuracy {acc:.3f})")
    np.seterr(all="ignore")
    return Paths(out=out, data=data, teacher=teacher, features=features)


# ---------------------------------------------------------------------------------------------
# Subprocesses: the real CLI, at most `jobs` at a time


def _env() -> dict:
    from ..engines import fresh_process_env

    env = fresh_process_env()  # a fresh process group each: nothing of a launcher's rank variables leaks in
    for k, v in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
                 "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        env.setdefault(k, v)
    return env


def run_parallel(commands: list[tuple[str, list[str], Path]], jobs: int) -> dict[str, float]:
    """Run ``(name, dmd2 arguments, log file)`` with at most ``jobs`` at once; returns seconds per
    name. The first failure stops the others and exits with its log's tail."""
    pending, running, seconds = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, args, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "w", encoding="utf-8")
            cmd = [sys.executable, "-m", "dmd2", *args]
            f.write("$ dmd2 " + " ".join(args) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)
            running[name] = (proc, f, log, time.time())
            _say(f"started  {name}: dmd2 {' '.join(args[:2])} ... (log {log})")
        time.sleep(0.5)
        for name, (proc, f, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            f.close()
            del running[name]
            seconds[name] = time.time() - t0
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.terminate()
                tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
                sys.exit(f"[demo] {name} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
            _say(f"finished {name} in {seconds[name]:.0f} s")
    return seconds


# ---------------------------------------------------------------------------------------------
# 2-4. Train, evaluate, sample


def _nfe(recipe: str) -> int:
    from ..config import load_recipe

    return load_recipe(REPO / recipe).generator.num_steps


def eval_plan(profile: Profile) -> list[tuple[Student, int | None]]:
    """One ``dmd2 eval`` per teacher row, each beside the student with the same number of calls
    (else the first); students not paired get an eval of their own."""
    plan = [(next((s for s in profile.students if _nfe(s.recipe) == k), profile.students[0]), k)
            for k in profile.teacher_steps]
    plan += [(s, None) for s in profile.students if all(p[0] is not s for p in plan)]
    return plan


def _eval_name(student: Student, k: int | None) -> str:
    return f"eval_{student.name}" + (f"_teacher{k}" if k else "")


def train_and_eval(profile: Profile, p: Paths, jobs: int) -> dict[str, float]:
    train_cmds = []
    for s in profile.students:
        run = p.out / s.name
        shutil.rmtree(run, ignore_errors=True)  # a fresh run each time: the demo's numbers are reproducible
        p.runs[s.name] = run
        args = ["train", str(REPO / s.recipe), f"output_dir={run.resolve()}", f"model.teacher={p.teacher.resolve()}",
                f"data.real_images={(p.data / 'train').resolve()}"]
        if s.max_steps is not None:
            args.append(f"train.max_steps={s.max_steps}")
        args += list(s.overrides)
        train_cmds.append((f"train {s.name}", args, p.out / "logs" / f"train_{s.name}.log"))
    seconds = run_parallel(train_cmds, jobs)

    eval_cmds = []
    for s, k in eval_plan(profile):
        name = _eval_name(s, k)
        args = ["eval", str(p.runs[s.name].resolve()), "--fid", "--feature-extractor", str(p.features.resolve()),
                "--ref-dir", str((p.data / "train").resolve()), "--num-images", str(profile.num_images),
                "--seed", "0", "--batch-size", "250", "--stats-cache", str((p.out / "fid_stats").resolve()),
                "--images-dir", str((p.out / "eval" / name).resolve()), "--out", str((p.out / "eval" / f"{name}.json").resolve())]
        if k is not None:
            args += ["--teacher", "--teacher-steps", str(k)]
        eval_cmds.append((name, args, p.out / "logs" / f"{name}.log"))
    for s in profile.students:
        args = ["sample", str(p.runs[s.name].resolve()), "--labels", "all", "--num-images", str(profile.grid_images),
                "--batch-size", "100", "--out", str((p.out / "samples" / s.name).resolve()), "--overwrite"]
        eval_cmds.append((f"sample {s.name}", args, p.out / "logs" / f"sample_{s.name}.log"))
    seconds.update(run_parallel(eval_cmds, jobs))
    return seconds


# ---------------------------------------------------------------------------------------------
# Rows from the images dmd2 eval kept


def collect_rows(profile: Profile, p: Paths) -> tuple[list[Row], dict[str, Path]]:
    """One row per sampler (FID from the eval reports; precision, recall and label accuracy from
    the same images) plus the real-vs-real floor; and the image folder of each row."""
    judge = Judge(p.features, p.data / "train")
    rows, folders, seen = [], {}, set()
    for s, k in eval_plan(profile):
        name = _eval_name(s, k)
        report = json.loads((p.out / "eval" / f"{name}.json").read_text())
        fid = {m["name"]: m["value"] for m in report["metrics"]}
        found = []
        if k is not None:
            found.append((f"teacher@{k}", k, p.out / "eval" / name / f"teacher_{k}steps", fid["teacher/fid"]))
        if s.name not in seen:
            seen.add(s.name)
            nfe = len(report["protocol"]["timesteps"])
            found.append((f"{s.name}@{nfe}", nfe, p.out / "eval" / name / "student", fid["fid"]))
        for row_name, nfe, folder, value in found:
            rows.append(judge.row(row_name, nfe, folder, value, profile.num_images))
            folders[row_name] = folder
    rows.append(judge.floor(p.data / "heldout"))
    order = {"t": 0, "s": 1, "r": 2}
    rows.sort(key=lambda r: (order[r.name[0]], r.nfe))
    return rows, folders


def run(profile: Profile, out: Path, *, cache: Path = CACHE, jobs: int = 2, train_teacher: bool = False) -> list[Row]:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    p = prepare(out, cache, train_teacher)
    seconds = train_and_eval(profile, p, jobs)
    _say("scoring the kept images and timing each sampler")
    rows, folders = collect_rows(profile, p)
    measure_speed(rows, {f"{name}@": run for name, run in p.runs.items()}, p.teacher)
    (out / "report.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    grid = comparison_grid(rows, folders, out / "grid.png")
    checks = check_targets(rows, profile.targets)
    wall = time.time() - t0
    print()
    print(table(rows))
    print()
    for text, ok in checks:
        print(f"  [{'met' if ok else 'NOT MET'}] {text}")
    print()
    train_s = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k.startswith("train"))
    print(f"wall time {wall / 60:.1f} min ({train_s}); FID/precision/recall in the feature space of {p.features}")
    print(f"report      {out / 'report.json'}")
    print(f"grid        {grid} (rows: samplers, columns: digits 0-9); dmd2 sample grids in {out / 'samples'}")
    print(f"checkpoints {', '.join(str(r / 'checkpoints') for r in p.runs.values())}")
    print(f"logs        {out / 'logs'}")
    if not all(ok for _, ok in checks):
        sys.exit(1)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dmd2.digits.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--bench", action="store_true", help="make bench-quality: the same pipeline, longer")
    ap.add_argument("--profile", choices=sorted(PROFILES), help="demo (default), bench, or test (tests/test_digits.py)")
    ap.add_argument("--out", help="output folder (default: the profile's, e.g. runs/demo)")
    ap.add_argument("--cache", help=f"folder for the data and the feature extractor (default: {CACHE})")
    ap.add_argument("--jobs", type=int, default=2, help="dmd2 processes at once (one per core)")
    ap.add_argument("--train-teacher", action="store_true",
                    help="retrain the teacher with dmd2.digits.teacher (cached) instead of the checked-in copy")
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile or ("bench" if args.bench else "demo")]
    out = Path(args.out).resolve() if args.out else REPO / profile.out
    cache = Path(args.cache).resolve() if args.cache else REPO / CACHE
    run(profile, out, cache=cache, jobs=args.jobs, train_teacher=args.train_teacher)


if __name__ == "__main__":
    main()
