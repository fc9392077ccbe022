"""``make demo`` and ``make bench-quality``: distill the digits teachers on CPU and compare the
students with the teachers at equal sampling steps, in one table.

    python -m dmd2.digits.demo            # make demo: under 10 minutes on 2 idle CPU cores
    python -m dmd2.digits.demo --bench    # make bench-quality: all the students, longer, more samples
    python -m dmd2.digits.demo --bench --only digits-flow   # one benchmark's rows (runs/bench-quality-digits-flow)

Three benchmarks, one report (rows carry ``benchmark``):

- ``digits``: the class-conditional EDM teacher (``recipes/data/digits_teacher``);
- ``digits-t2i``: the SDXL-layout text-to-image teacher (``recipes/data/digits_t2i_teacher``: two
  CLIP encoders, a VAE, DDPM epsilon-prediction, CFG), prompted with the shipped prompts file
  (image i: prompt i mod 60, whose digit is i mod 10); its 16 px images are reduced to 8 x 8 grey
  (``t2i.downscale``) and judged in the same feature space as the digits;
- ``digits-flow`` (bench only): the SD3-layout flow-matching teacher
  (``recipes/data/digits_flow_teacher``: a tiny SD3Transformer2DModel on digits-t2i's VAE latents,
  the same prompts), judged as digits-t2i.

1. Data, teachers, judges: the digits as class folders (``runs/digits/data``), the captioned digits
   at 16 px for digits-t2i's GAN, the checked-in teachers (``--train-teacher`` retrains the digits
   one with ``dmd2.digits.teacher`` into a cache), the feature extractor (cached under
   ``runs/digits/``, keyed by a hash of its settings) and the label classifier.
2. ``dmd2 train`` for each student recipe, the same command and code path as SDXL; two runs at a
   time (one per core), the longest first.
3. ``dmd2 eval --draw-only [--teacher-only]`` per row (the longest first), which keeps its images: each student at all its
   timesteps, multi-step ones also at all but the last (``_first3``) and at their checkpoint a
   quarter of the way (``_quarter``); each teacher row (``--teacher-only``) from the run folder
   of a student of its benchmark. A run folder's evals run in one process (``evalgroup``), which
   imports the libraries once. FID, precision/recall and label accuracy are computed here from
   those images, as each group ends, while the other commands run.
4. ``dmd2 sample`` grids (make demo), ``<out>/report.json`` (one row per sampler), ``<out>/grid.png`` and the
   table; the profile's targets are checked and a miss exits 1.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .data import Split, write_digits
from .report import (
    DIGITS,
    FLOW,
    T2I,
    TEXT,
    Judge,
    Row,
    check_targets,
    comparison_grid,
    table,
)

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN_TEACHER = REPO / "recipes" / "data" / "digits_teacher"
CACHE = Path("runs") / "digits"  # data, retrained teacher, feature extractor
CLASSIFIER_VERSION = 1  # bump when classifiers.py changes what it trains


@dataclass(frozen=True)
class Student:
    name: str  # student_1step / student_4step
    recipe: str  # relative to the repository
    benchmark: str = DIGITS
    max_steps: int | None = None  # None: the recipe's own
    overrides: tuple[str, ...] = ()  # key.path=value, as on the dmd2 command line
    quarter: bool = False  # also score its checkpoint a quarter of the way (``<name>_quarter``)
    first: bool = False  # also score it on all its timesteps but the last (``<name>_first3``)
    # The regression stage (docs/algorithm.md §10): (pairs, teacher steps) drawn by dmd2 ode-pairs first
    pairs: tuple[int, int] | None = None
    init: str | None = None  # model.generator_init: the run of this benchmark's student of that name


@dataclass(frozen=True)
class TeacherRow:
    benchmark: str
    nfe: int
    cfg: float | None = None  # text benchmarks: guidance scale, 1 = none, None = the teacher's best (teacher_cfg)

    @property
    def name(self) -> str:
        return "teacher" if self.benchmark == DIGITS else "teacher_nocfg" if self.cfg == 1 else "teacher_cfg"


@dataclass(frozen=True)
class Profile:
    out: str
    students: tuple[Student, ...]
    teachers: tuple[TeacherRow, ...]
    num_images: int  # per sampler, classes evenly
    targets: str  # which quality targets are checked: demo, bench or test
    # images per ``dmd2 sample`` grid of each student (<out>/samples); 0: none, grid.png alone
    grid_images: int = 100
    budget_s: float | None = None  # the whole run's wall-time target (issue: demo 10 min, bench 60 min)


def text_teacher(benchmark: str) -> Path:
    """The checked-in teacher folder of a text benchmark."""
    from . import flow, t2i

    return {T2I: t2i.CHECKED_IN, FLOW: flow.CHECKED_IN}[benchmark]


def teacher_cfg(benchmark: str) -> float:
    """teacher_cfg's guidance: a text teacher's best at 50 steps (lowest FID with label accuracy >=
    0.95), as ``python -m dmd2.digits.t2i --check`` (``dmd2.digits.flow --check``) recorded it beside
    the weights. The students' own ``loss.cfg_scale`` is a distillation setting, chosen by
    measurement (docs/benchmarks.md)."""
    folder = text_teacher(benchmark)  # its record is <folder name>.json (t2i.py, flow.py)
    return float(json.loads((folder / f"{folder.name}.json").read_text())["quality"]["summary"]["best_guidance_scale"])


def _teachers(benchmark: str, nfes: tuple[int, ...], nocfg: tuple[int, ...] = ()) -> tuple[TeacherRow, ...]:
    return tuple(TeacherRow(benchmark, k) for k in nfes) + tuple(TeacherRow(benchmark, k, 1.0) for k in nocfg)


_FAST = ("optim.generator.lr=3e-4", "optim.critic.lr=1e-3", "optim.generator.schedule=constant",
         "optim.critic.schedule=constant", "train.batch_size=64")
_T2I_1STEP_RATES = ("optim.generator.lr=2e-4", "optim.critic.lr=6e-4")
PROFILES = {
    "demo": Profile("runs/demo", (Student("student_1step", "recipes/digits_1step.yaml"),
                                  Student("student_1step", "recipes/digits_t2i_1step.yaml", T2I)),
                    # digits-t2i's teacher at its student's calls only: its 50-step CFG row (1.5 min to
                    # draw and time) is make bench-quality's, and keeps make demo under 10 minutes
                    _teachers(DIGITS, (1, 4, 50)) + _teachers(T2I, (1,)), 1000, "demo", budget_s=600),
    # The 1-step student at batch 256 for 1200 steps (the compute of 2400 at the recipe's 128): FID
    # 0.965 at n=2000 against the teacher's 1.09 at 50 calls; 1500 gave 1.002, 1000 1.447
    # (docs/benchmarks.md, "Steps for a 60-minute bench"). The 4-step student keeps 2000: 1800 gave
    # 0.989, over 0.965.
    "bench": Profile("runs/bench-quality", (
        Student("student_1step", "recipes/digits_1step.yaml", DIGITS, 1200, ("train.batch_size=256",)),
        Student("student_4step", "recipes/digits_4step.yaml", DIGITS, 2000, quarter=True, first=True),
        # digits-t2i's 1-step students at twice the recipe's rates: over 1000 steps the cold one gave
        # FID 3.95 at n=2000 against 5.34 at the recipe's rates, as good as 2000 steps at those
        # (3.82) in half the time (docs/benchmarks.md, "digits-t2i's 1-step students at twice the
        # rates").
        Student("student_1step", "recipes/digits_t2i_1step.yaml", T2I, 1000, _T2I_1STEP_RATES),
        # digits-t2i's 4-step student at batch 64 (twice the recipe's generator updates per image): on
        # one machine it beat the recipe's batch at three of four seeds (mean 3.87 against 4.45) and its
        # 1-step student at four of five (docs/benchmarks.md, "Missed targets"). Over 2000 steps: FID
        # 3.54 (first three steps 3.57) against its 1-step student's 3.95. 1750 gave 3.84 at one thread
        # but 4.74 at two (another float path), over 3.95; 1500 4.04 (docs/benchmarks.md, "Steps for a
        # 60-minute bench")
        Student("student_4step", "recipes/digits_t2i_4step.yaml", T2I, 2000, ("train.batch_size=64",), quarter=True,
                first=True),
        # the authors' 1-step SDXL warm start: ODE pairs, the regression stage, then DMD2 from it
        # at the cold student's steps and rates, so the two compare. Shorter measured worse than the
        # cold student: 750 DMD2 steps FID 5.93; 500 regression steps recall 0.829 against its 0.831
        Student("regression_only", "recipes/digits_t2i_1step_regression.yaml", T2I, pairs=(1000, 25)),
        Student("student_1step_warm", "recipes/digits_t2i_1step_warm.yaml", T2I, 1000, _T2I_1STEP_RATES,
                init="regression_only"),
        # the flow-matching (SD3) path; the 1-step student over 300 of its recipe's 1000 steps (cosine
        # over 300): FID 6.42 at n=2000 (label accuracy 0.984, recall 0.819); 400 gave 8.02, 600 6.01,
        # 750 6.65, 1000 6.62, all far under the teacher's 9.73 at 50 calls
        Student("student_1step", "recipes/digits_flow_1step.yaml", FLOW, 300),
        # the 4-step student over 300 of its recipe's 500 steps: 4.67 (first3 4.71, quarter 18.58); 400
        # gave 4.65 (5.51, 7.97), 500 4.52 (6.69, 5.42)
        Student("student_4step", "recipes/digits_flow_4step.yaml", FLOW, 300, quarter=True, first=True)),
        # digits-flow's teacher without CFG is in its own record (digits_flow_teacher.json, written by
        # dmd2.digits.flow --check), and no target reads it: redrawing it (144 core-seconds at 8774b25) is
        # left out of the 60-minute budget, as are the dmd2 sample grids (grid_images=0; 80 core-seconds
        # at 8774b25; grid.png shows every row's images, and make demo keeps the grids)
        _teachers(DIGITS, (1, 4, 50)) + _teachers(T2I, (1, 4, 50), (50,)) + _teachers(FLOW, (1, 4, 50)),
        2000, "bench", grid_images=0, budget_s=3600),
    # tests/test_digits.py: the 1-step students, briefly trained, against the 1-call teachers.
    # 150 steps need the faster constant rates of the recipe's first version (at the recipe's own
    # 1e-4/3e-4 cosine the student is at FID 43 after 150 steps, 0.65x the teacher's).
    "test": Profile("runs/demo-test", (Student("student_1step", "recipes/digits_1step.yaml", DIGITS, 150, _FAST),),
                    _teachers(DIGITS, (1,)), 300, "test", grid_images=20),
    "test-t2i": Profile("runs/demo-test-t2i", (Student("student_1step", "recipes/digits_t2i_1step.yaml", T2I, 300,
                                                       _FAST),), _teachers(T2I, (1,)), 300, "test", grid_images=20),
    "test-flow": Profile("runs/demo-test-flow", (Student("student_1step", "recipes/digits_flow_1step.yaml", FLOW, 200,
                                                         _FAST),), _teachers(FLOW, (1,)), 300, "test", grid_images=20),
}


@dataclass
class Paths:
    out: Path
    data: Path
    teacher: Path
    features: Path
    t2i_data: Path | None = None  # the captioned training digits at 16 px (digits-t2i's GAN data)
    runs: dict[str, Path] = field(default_factory=dict)  # by run key (benchmark/name)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Data, teacher, judges


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def prepare(out: Path, cache: Path, train_teacher: bool, t2i: bool = False) -> Paths:
    import numpy as np

    from ..files import publish_folder
    from . import classifiers
    from .data import read_class_folders

    data = write_digits(cache / "data", Split())
    if train_teacher:
        from .teacher import TeacherSettings
        from .teacher import train_teacher as run_teacher

        s = TeacherSettings()
        teacher = cache / f"teacher-{s.digest()}"
        # the record train_teacher writes last (digits_teacher.json) is the folder's stamp: a
        # finished teacher is kept; publish_folder builds in a folder of this process's own, so
        # two demos training it at once never rename each other's half-written copy into place
        stamp = json.loads(json.dumps({"settings": asdict(s), "digest": s.digest(),
                                       "made_by": "python -m dmd2.digits.teacher"}))

        def build(folder: Path) -> None:
            _say(f"training the teacher into {teacher} (dmd2.digits.teacher, ~15 min on one idle core)")
            run_teacher(folder, s)

        publish_folder(teacher, "digits_teacher.json", stamp, build)
    else:
        teacher = CHECKED_IN_TEACHER
    settings = {"split": asdict(Split()), "version": CLASSIFIER_VERSION, "epochs": 40, "seed": 0}
    features = cache / f"features-{_digest(settings)}" / "features.pt"

    def build_features(folder: Path) -> None:
        _say("training the feature extractor on the training split (~20 s)")
        train, heldout = read_class_folders(data / "train"), read_class_folders(data / "heldout")
        classifiers.train_feature_extractor(train, heldout, folder / features.name,
                                            epochs=settings["epochs"], seed=settings["seed"])

    publish_folder(features.parent, "settings.json", json.loads(json.dumps(settings)), build_features)
    acc = json.loads(features.with_suffix(".json").read_text())["heldout_accuracy"]
    _say(f"data {data} | teacher {teacher} | feature extractor {features} (held-out accuracy {acc:.3f})")
    np.seterr(all="ignore")
    t2i_data = None
    if t2i:
        from .t2i import write_captioned_digits

        t2i_data = write_captioned_digits(cache / "t2i_data")
    return Paths(out=out, data=data, teacher=teacher, features=features, t2i_data=t2i_data)


# ---------------------------------------------------------------------------------------------
# Subprocesses: the real CLI, at most `jobs` at a time


def _env(threads: int = 1) -> dict:
    """A dmd2 process's environment with ``threads`` CPU threads: the cores divided among the
    commands that run at once, so a command running alone (a student's training, which the
    evaluations wait for) is not held to one core while the others idle."""
    from ..engines import fresh_process_env

    env = fresh_process_env()  # a fresh process group each: nothing of a launcher's rank variables leaks in
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    for k, v in {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        env.setdefault(k, v)
    return env


def available_cores() -> int:
    """The CPUs this process may run on (its affinity, e.g. under taskset or a cgroup cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _threads(jobs: int, ready: int, cores: int) -> int:
    """Threads for a command started while ``ready`` commands (itself included) could run now: the
    ``cores`` shared among them. More OpenMP threads than free cores is far worse than fewer:
    beside one busy core a 2-thread training on 2 cores ran 15x slower than alone (README "The
    main job on CPU"; tests/helpers.py run_demo passes --cores)."""
    return max(1, cores // max(1, min(jobs, ready)))


def run_parallel(commands: list[tuple], jobs: int, on_done=None, cores: int | None = None) -> dict[str, float]:
    """Run ``(name, dmd2 arguments, log file[, after[, threads]])`` with at most ``jobs`` at once, in
    order, except that a command waits for the one named ``after``; arguments may be a function,
    called at the start (e.g. to read a finished run), and a list of argument lists is a group of
    commands run in turn in one process (``evalgroup``). ``threads``: the command's own count
    instead of its share of the cores (``_threads``). ``on_done(name)`` runs here after each command
    succeeds, once the next ones have started. Returns seconds per name. The first failure (of a
    command or of ``on_done``) stops the others; a command's exits with its log's tail."""
    cores = cores or available_cores()  # default: all the CPUs this process may use
    pending, running, seconds = [tuple(c) + (None,) * (5 - len(c)) for c in commands], {}, {}
    done: list[str] = []
    while pending or running or done:
        while len(running) < jobs:
            ready = next((c for c in pending if c[3] is None or c[3] in seconds), None)
            if ready is None:
                break
            runnable = sum(c[3] is None or c[3] in seconds for c in pending)  # ``ready`` included
            pending.remove(ready)
            name, args, log, _, threads = ready
            threads = threads or _threads(jobs, len(running) + runnable, cores)
            args = args() if callable(args) else args
            log.parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "w", encoding="utf-8")
            if isinstance(args[0], list):  # a group: one process, each command in turn (evalgroup)
                group = log.with_suffix(".json")
                group.write_text(json.dumps(args, indent=1) + "\n")
                cmd = [sys.executable, "-m", "dmd2.digits.evalgroup", str(group)]  # it logs each "$ dmd2" line
            else:
                cmd = [sys.executable, "-m", "dmd2", *args]
                f.write("$ dmd2 " + " ".join(args) + "\n")
                f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(threads), stdout=f, stderr=subprocess.STDOUT)
            running[name] = (proc, f, log, time.time())
            what = f"{len(args)} dmd2 {args[0][0]} commands" if isinstance(args[0], list) else f"dmd2 {' '.join(args[:2])} ..."
            _say(f"started  {name}: {what} (log {log})")
        if done:  # the parent's own work (scoring a finished eval's images) while the commands run
            try:
                on_done(done.pop(0))
            except BaseException:
                for other, *_ in running.values():
                    other.terminate()
                raise
            continue
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
            if on_done is not None:
                done.append(name)
    return seconds


# ---------------------------------------------------------------------------------------------
# 2-4. Train, evaluate, sample


def _key(s: Student) -> str:
    return f"{s.benchmark}/{s.name}"


@dataclass(frozen=True)
class Eval:
    """One ``dmd2 eval``: a student row (all its timesteps, all but the last, or its quarter
    checkpoint), or a teacher row drawn beside the first student of its benchmark."""

    name: str  # its folder and log: <benchmark>_<row>_<nfe>
    student: Student
    row: str  # the row's name
    teacher: TeacherRow | None = None
    variant: str = ""  # "", "first3" or "quarter"


def eval_plan(profile: Profile) -> list[Eval]:
    plan = []
    for s in profile.students:
        plan.append(Eval(f"{s.benchmark}_{s.name}", s, s.name))
        if s.first:
            plan.append(Eval(f"{s.benchmark}_{s.name}_first", s, f"{s.name}_first3", variant="first3"))
        if s.quarter:
            plan.append(Eval(f"{s.benchmark}_{s.name}_quarter", s, f"{s.name}_quarter", variant="quarter"))
    for t in profile.teachers:
        s = next(s for s in profile.students if s.benchmark == t.benchmark)
        plan.append(Eval(f"{t.benchmark}_{t.name}_{t.nfe}", s, t.name, teacher=t))
    return plan


def quarter_args(steps: int) -> list[str]:
    """The train overrides that keep a checkpoint at a quarter of a ``steps``-step run: one every
    quarter, all of them kept (the last is the run's end, a fifth when ``steps`` is not a multiple of 4)."""
    quarter = steps // 4
    if quarter < 1:  # no step a quarter of the way to keep
        raise ValueError(f"a _quarter row needs a run of at least 4 steps, not {steps}")
    return [f"train.checkpoint_every={quarter}", f"train.keep_last={-(-steps // quarter)}"]


def quarter_copy(run: Path, quarter: int) -> Path:
    """The run folder as it stood at step ``quarter``: a copy without the later checkpoints."""
    from .. import checkpoint

    early = run.with_name(run.name + "_quarter")
    shutil.rmtree(early, ignore_errors=True)
    shutil.copytree(run, early)
    for ckpt in checkpoint.committed(early):
        if checkpoint.read_state(ckpt)["step"] > quarter:
            shutil.rmtree(ckpt)
    return early


@functools.cache
def _recipe(path: str):
    from ..config import load_recipe

    return load_recipe(REPO / path)


def _max_steps(s: Student) -> int:
    return s.max_steps or _recipe(s.recipe).train.max_steps


def train_and_eval(profile: Profile, p: Paths, jobs: int, rescore: bool = False, on_done=None,
                   cores: int | None = None) -> dict[str, float]:
    """Train every student (``rescore``: keep the finished runs already in ``p.out``), then the
    evals and sample grids; ``on_done(name)`` after each (``run_parallel``)."""
    from .t2i import PROMPTS_FILE

    train_cmds = []
    for s in sorted(profile.students, key=_cost, reverse=True):  # the longest first: two jobs end closer together
        run = p.out / f"{s.benchmark}_{s.name}"
        p.runs[_key(s)] = run
        if rescore:
            _check_finished(run, _max_steps(s))
            continue
        shutil.rmtree(run, ignore_errors=True)  # a fresh run each time: the demo's numbers are reproducible
        args = ["train", str(REPO / s.recipe), f"output_dir={run.resolve()}"]
        if s.benchmark == DIGITS:
            args += [f"model.teacher={p.teacher.resolve()}", f"data.real_images={(p.data / 'train').resolve()}"]
        else:
            args += [f"data.real_images={p.t2i_data.resolve()}"]
        args.append(f"train.max_steps={_max_steps(s)}")
        if s.quarter:
            args += quarter_args(_max_steps(s))
        after = None
        if s.pairs is not None:  # draw the pairs first (fresh, as the runs; first in line: a chain waits on them)
            pairs = p.out / f"{s.benchmark}_pairs"
            shutil.rmtree(pairs, ignore_errors=True)
            train_cmds.insert(0, (f"pairs {_key(s)}", ["ode-pairs", str(REPO / s.recipe), "--num-pairs", str(s.pairs[0]),
                                                    "--steps", str(s.pairs[1]), "--batch-size", "50",
                                                    "--out", str(pairs.resolve())],
                               p.out / "logs" / f"pairs_{s.benchmark}_{s.name}.log"))
            args.append(f"regression.pairs={pairs.resolve()}")
            after = f"pairs {_key(s)}"
        if s.init is not None:
            init = Student(s.init, "", s.benchmark)
            args.append(f"model.generator_init={(p.out / f'{s.benchmark}_{s.init}').resolve()}")
            after = f"train {_key(init)}"
        args += list(s.overrides)
        train_cmds.append((f"train {_key(s)}", args, p.out / "logs" / f"train_{s.benchmark}_{s.name}.log", after))
    # each student's evals start as soon as its training ends, on the core it frees

    def eval_args(e: Eval) -> list[str]:
        run = p.runs[_key(e.student)]
        extra = []
        if e.variant == "quarter":
            run = quarter_copy(run, _max_steps(e.student) // 4)
        elif e.variant == "first3":
            from ..models.student import load_student

            extra += ["--timesteps", ",".join(map(str, load_student(run).timesteps[:-1]))]
        if e.student.benchmark in TEXT:  # image i: prompt i mod 60, whose digit is i mod 10
            extra += ["--prompts-file", str(PROMPTS_FILE)]
        if e.teacher is not None:  # the student's own rows are drawn by its own evals
            extra += ["--teacher-only", "--teacher-steps", str(e.teacher.nfe)]
            if e.student.benchmark in TEXT:
                extra += ["--teacher-cfg", str(e.teacher.cfg or teacher_cfg(e.student.benchmark))]
        # --draw-only: the demo's Judge takes FID with precision and recall from one pass of features
        # over the kept images (the same features and FID, bit for bit, as dmd2 eval --fid with the
        # same extractor), so each image folder is read once instead of twice
        return ["eval", str(run.resolve()), "--draw-only", "--num-images", str(profile.num_images),
                "--seed", "0", "--batch-size", "250", "--images-dir", str((p.out / "eval" / e.name).resolve()),
                "--out", str((p.out / "eval" / f"{e.name}.json").resolve()), *extra]

    after = (lambda s: None) if rescore else (lambda s: f"train {_key(s)}")
    # One process for each run folder's evals (its rows and the teacher rows drawn from it), run by
    # evalgroup: each dmd2 eval process spent about 7.6 s starting up (82% of it imports) before
    # its first image, 24 times in make bench-quality; 8 groups. The groups, and the rows in each,
    # the longest first, as the trainings: a 50-step teacher row started last ran alone for 6
    # minutes at the end of the bench while the other core idled (docs/benchmarks.md, "Earlier runs").
    groups: dict[str, list[Eval]] = {}
    for e in sorted(eval_plan(profile), key=_eval_cost, reverse=True):
        groups.setdefault(f"evals {_key(e.student)}", []).append(e)
    # One thread each, whatever is free: each row's images/s (dmd2 eval's report) is one core's.
    eval_cmds = [(name, lambda g=g: [eval_args(e) for e in g],
                  p.out / "logs" / f"evals_{g[0].student.benchmark}_{g[0].student.name}.log", after(g[0].student), 1)
                 for name, g in sorted(groups.items(), key=lambda kv: -sum(map(_eval_cost, kv[1])))]
    grids = profile.students if profile.grid_images else ()
    if not grids:  # no grids from an earlier run beside this run's report
        shutil.rmtree(p.out / "samples", ignore_errors=True)
    for s in grids:
        cond = ["--labels", "all"] if s.benchmark == DIGITS else ["--prompts-file", str(PROMPTS_FILE)]
        args = ["sample", str(p.runs[_key(s)].resolve()), *cond, "--num-images", str(profile.grid_images),
                "--batch-size", "100", "--out", str((p.out / "samples" / f"{s.benchmark}_{s.name}").resolve()),
                "--overwrite"]
        eval_cmds.append((f"sample {_key(s)}", args, p.out / "logs" / f"sample_{s.benchmark}_{s.name}.log",
                          after(s)))

    def done(name: str) -> None:  # a group's rows, each in turn
        for row in [e.name for e in groups[name]] if name in groups else [name]:
            on_done(row)

    return run_parallel(train_cmds + eval_cmds, jobs, done if on_done is not None else None, cores)


def _check_finished(run: Path, steps: int) -> None:
    from .. import checkpoint

    done = [checkpoint.read_state(c)["step"] for c in checkpoint.committed(run)] if run.is_dir() else []
    if steps not in done:
        sys.exit(f"[demo] --rescore: {run} has no finished run of {steps} steps (checkpoints at {done or 'none'}); "
                 "run without --rescore to train it")


def _cost(s: Student) -> float:
    """Rough core-seconds of a training run, to start the longest first (s/step measured here on
    one core at batch 128: digits 1-step 0.4, 4-step 0.45; digits-t2i 1-step 0.7, 4-step 0.9;
    digits-flow 1-step 1.4, 4-step 1.8, from its recipes' batch 64 doubled: 0.68 and 0.88-0.98)."""
    r = _recipe(s.recipe)
    batch = next((int(o.split("=")[1]) for o in s.overrides if o.startswith("train.batch_size=")), r.train.batch_size)
    multi = r.generator.num_steps > 1
    per_step = _PER_STEP[s.benchmark] + {T2I: 0.2, FLOW: 0.4, DIGITS: 0.05}[s.benchmark] * multi
    if r.regression is not None:  # the generator alone
        per_step = 0.25
    return _max_steps(s) * per_step * batch / 128


_PER_STEP = {DIGITS: 0.4, T2I: 0.7, FLOW: 1.4}  # a 1-step training step's cost, as a network call's


def _eval_cost(e: Eval) -> float:
    """Rough relative cost of an eval: network calls per image (a text teacher with CFG makes two)
    times its benchmark's cost per call."""
    bench = e.student.benchmark
    if e.teacher is not None:
        cfg = e.teacher.cfg or (teacher_cfg(bench) if bench in TEXT else 1.0)
        calls = e.teacher.nfe * (2 if cfg != 1 else 1)
    else:
        calls = _recipe(e.student.recipe).generator.num_steps - (e.variant == "first3")
    return calls * _PER_STEP[bench]


# ---------------------------------------------------------------------------------------------
# Rows from the images dmd2 eval kept


class Scorer:
    """Each eval's row, scored as soon as its ``dmd2 eval`` finishes (``run_parallel``'s
    ``on_done``: the parent's scoring then shares the cores with the commands still running, rather
    than holding one of them idle at the end), then ``collect_rows`` for the table."""

    def __init__(self, profile: Profile, p: Paths):
        self.profile, self.p = profile, p
        self.plan = {e.name: e for e in eval_plan(profile)}
        self.scored: dict[str, tuple[Row, Path]] = {}
        self._judge = None

    @property
    def judge(self) -> Judge:
        if self._judge is None:
            self._judge = Judge(self.p.features, self.p.data / "train")
        return self._judge

    def __call__(self, name: str) -> None:
        """Score eval ``name`` (other commands' names are ignored)."""
        e = self.plan.get(name)
        if e is None:
            return
        p = self.p
        report = json.loads((p.out / "eval" / f"{e.name}.json").read_text())
        base = p.out / "eval" / e.name
        if e.teacher is not None:
            folder, nfe, steps = base / f"teacher_{e.teacher.nfe}steps", e.teacher.nfe, None
        else:
            folder, nfe, steps = base / "student", len(report["protocol"]["timesteps"]), report["step"]
        row, folder = self.judge.score(e.row, nfe, folder, self.profile.num_images, e.student.benchmark, steps=steps)
        # images/s: dmd2 eval's own timing of the draw (2000 images in batches of 250 on one thread, beside
        # at most one other single-thread command; run_parallel gives the evals one thread each). Two
        # single-thread processes side by side ran at the speed of one alone (docs/benchmarks.md, "Why the
        # work is not simply made faster"), so this is one core's speed, taken on more images (2000 against
        # 500, or 100 for a 50-step teacher) than timing each sampler again after the last command did, and
        # at no cost in wall time. The student's variants (first3, quarter) share its sampler.
        if e.teacher is not None:
            row.images_per_s = report["teacher"]["images_per_s"]
        elif not e.variant:
            row.images_per_s = report["images_per_s"]
        self.scored[name] = (row, folder)


def collect_rows(scorer: Scorer) -> tuple[list[Row], dict[str, Path]]:
    """One row per sampler (FID, precision, recall and label accuracy taken here from the images
    ``dmd2 eval --draw-only`` kept; the text benchmarks' reduced to 8 x 8 grey first, into the same
    feature space; images/s from its report), the real-vs-real floor of each benchmark, and the
    image folder of each row (by ``Row.key``). The rows ``scorer`` has already scored are kept."""
    profile, p = scorer.profile, scorer.p
    rows, folders = [], {}
    for name in scorer.plan:
        if name not in scorer.scored:
            scorer(name)
        row, folder = scorer.scored[name]
        rows.append(row)
        folders[row.key] = folder
    floor = scorer.judge.floor(p.data / "heldout")
    for bench in dict.fromkeys(s.benchmark for s in profile.students):
        # the text benchmarks' real images are the same digits at 16 px; reduced, they are these exactly
        rows.append(replace(floor, benchmark=bench))
    order = {"t": 0, "s": 1, "r": 2}
    benches = (DIGITS, T2I, FLOW)
    rows.sort(key=lambda r: (benches.index(r.benchmark), order[r.name[0]], r.name, r.nfe))
    return rows, folders


def run(profile: Profile, out: Path, *, cache: Path = CACHE, jobs: int | None = None, cores: int | None = None,
        train_teacher: bool = False, rescore: bool = False) -> list[Row]:
    t0 = time.time()
    cores = cores or available_cores()
    jobs = jobs or min(2, cores)  # two commands at once, but not more than the cores they share
    out.mkdir(parents=True, exist_ok=True)
    p = prepare(out, cache, train_teacher, t2i=any(s.benchmark in TEXT for s in profile.students))
    scorer = Scorer(profile, p)
    import torch

    threads = torch.get_num_threads()
    # The scoring done here while the commands run (Scorer) shares the cores they hold, and more
    # OpenMP threads than free cores is far worse than fewer (_threads). Alone, two threads spent
    # 24.8 core-seconds where one spent 17.1 loading the judge and scoring two rows; in make
    # bench-quality the evals took 1206 core-seconds against 1356, every row equal to the bit
    # (docs/benchmarks.md, the run at 91f95cf). The scoring after the last command, on free cores,
    # gets them all back.
    torch.set_num_threads(1)
    try:
        seconds = train_and_eval(profile, p, jobs, rescore, on_done=scorer, cores=cores)
    finally:
        torch.set_num_threads(threads)
    _say("scoring the kept images")
    rows, folders = collect_rows(scorer)
    (out / "report.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    grid = comparison_grid(rows, folders, out / "grid.png")
    wall = time.time() - t0
    # the wall-time target is the whole run's: a rescore (or one benchmark's rows, --only) has none
    checks = check_targets(rows, profile.targets, None if rescore else wall, profile.budget_s)
    print()
    print(table(rows))
    print()
    for text, ok in checks:
        print(f"  [{'met' if ok else 'NOT MET'}] {text}")
    print()
    train_s = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k.startswith("train"))
    print(f"wall time {wall / 60:.1f} min ({train_s}); FID/precision/recall in the feature space of {p.features}")
    print(f"report      {out / 'report.json'}")
    samples = f"; dmd2 sample grids in {out / 'samples'}" if profile.grid_images else ""
    print(f"grid        {grid} (rows: samplers, columns: digits 0-9){samples}")
    print(f"checkpoints {', '.join(str(r / 'checkpoints') for r in p.runs.values())}")
    print(f"logs        {out / 'logs'}")
    if not all(ok for _, ok in checks):
        sys.exit(1)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dmd2.digits.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--bench", action="store_true", help="make bench-quality: the same pipeline, longer")
    ap.add_argument("--profile", choices=sorted(PROFILES),
                    help="demo (default), bench, or test / test-t2i / test-flow (tests/test_digits*.py)")
    ap.add_argument("--out", help="output folder (default: the profile's, e.g. runs/demo)")
    ap.add_argument("--cache", help=f"folder for the data and the feature extractor (default: {CACHE})")
    ap.add_argument("--jobs", type=int, default=None, help="dmd2 processes at once (default: 2, at most --cores)")
    ap.add_argument("--cores", type=int, default=None,
                    help="CPU cores the dmd2 processes share (default: all this process may use); "
                         "a command running alone gets them all as threads")
    ap.add_argument("--train-teacher", action="store_true",
                    help="retrain the teacher with dmd2.digits.teacher (cached) instead of the checked-in copy")
    ap.add_argument("--rescore", action="store_true",
                    help="keep the finished student runs in the output folder; evaluate and report again")
    ap.add_argument("--only", choices=(DIGITS, T2I, FLOW),
                    help="one benchmark's rows of the profile (default folder: the profile's, suffixed -BENCHMARK)")
    args = ap.parse_args(argv)
    for flag, value in (("--jobs", args.jobs), ("--cores", args.cores)):
        if value is not None and value < 1:
            ap.error(f"{flag} {value}: must be at least 1")
    profile = PROFILES[args.profile or ("bench" if args.bench else "demo")]
    if args.only:
        students = tuple(s for s in profile.students if s.benchmark == args.only)
        if not students:
            ap.error(f"--only {args.only}: the {args.profile or ('bench' if args.bench else 'demo')} profile has no "
                     f"{args.only} students")
        # its own folder: a one-benchmark report never overwrites the profile's whole one
        profile = replace(profile, out=f"{profile.out}-{args.only}", students=students, budget_s=None,
                          teachers=tuple(t for t in profile.teachers if t.benchmark == args.only))
    out = Path(args.out).resolve() if args.out else REPO / profile.out
    cache = Path(args.cache).resolve() if args.cache else REPO / CACHE
    run(profile, out, cache=cache, jobs=args.jobs, cores=args.cores, train_teacher=args.train_teacher,
        rescore=args.rescore)


if __name__ == "__main__":
    main()
