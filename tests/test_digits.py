"""The embedded default: the digits data, teacher and judges, and a much shorter `make demo`
end to end that checks the student really beats the teacher at one network call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_demo

from dmd2.digits import classifiers
from dmd2.digits.data import Split, load_split, read_class_folders, write_digits
from dmd2.digits.metrics import precision_recall
from dmd2.digits.teacher import TeacherSettings, build_unet, edm_loss

REPO = Path(__file__).resolve().parent.parent
TEACHER = REPO / "recipes" / "data" / "digits_teacher"


def test_split_is_stratified_seeded_and_readable_by_the_trainer(tmp_path):
    from dmd2.data import RealImages

    split = load_split()
    assert len(split["train"][0]) == 1437 and len(split["heldout"][0]) == 360
    assert np.bincount(split["heldout"][1]).min() >= 35  # every class held out
    again = load_split()
    assert np.array_equal(split["heldout"][0], again["heldout"][0])

    root = write_digits(tmp_path / "digits")
    images, labels = read_class_folders(root / "train")
    assert images.shape == (1437, 8, 8, 3) and np.array_equal(np.sort(labels), np.sort(split["train"][1]))
    real = RealImages(root / "train", 8, labelled=True, num_classes=10)
    x, items = real.load([0, 1000])
    assert x.shape == (2, 3, 8, 8) and -1 <= x.min() and x.max() <= 1 and items[1].label == labels[1000]
    assert write_digits(tmp_path / "digits", Split()) == root  # kept when the split is unchanged


def test_digits_cache_survives_two_writers_and_a_half_written_folder(tmp_path):
    """Two experiments started together prepare the same data cache: each builds in a folder of its
    own and renames it into place, so neither deletes or writes into the other's half-written
    folder (before, one rmtree'd the other's, which then crashed or was read half-written)."""
    out = tmp_path / "digits"
    code = f"from dmd2.digits.data import write_digits; write_digits({str(out)!r})"

    def start():
        return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)

    def complete():
        return len(read_class_folders(out / "train")[0]) == 1437 and len(read_class_folders(out / "heldout")[0]) == 360

    first = start()
    deadline = time.monotonic() + 120
    while not any(tmp_path.iterdir()) and time.monotonic() < deadline:  # the first has begun writing
        time.sleep(0.01)
    second = start()
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert complete()  # what the first writer returned is whole while the second still writes
    assert second.wait(timeout=300) == 0, second.stderr.read()[-2000:]
    assert complete()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no temp folder left behind

    (out / "split.json").unlink()  # as a writer killed before its stamp leaves it
    (out / "train" / "1" / "stale.png").write_bytes(b"half")
    write_digits(out)
    assert not (out / "train" / "1" / "stale.png").exists() and (out / "split.json").is_file()


def test_teacher_loss_uses_the_trainer_edm_preconditioning():
    """edm_loss (continuous sigma) is EDM eq. 8 with the Denoiser's c_skip/c_out/c_in/c_noise on the grid."""
    from dmd2.models import Denoiser
    from dmd2.schedule import EDMSchedule

    torch.manual_seed(0)
    unet = build_unet(TeacherSettings(block_out_channels=(16, 32), norm_num_groups=8, dropout=0.0)).eval()
    sched = EDMSchedule()
    x0, eps, labels = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8), torch.tensor([0, 4, 9])
    for t in (10, 500, 999):
        tt = torch.full((3,), t)
        sigma = sched.sigmas[t].float()
        with torch.no_grad():
            d = Denoiser(unet, sched)(sched.add_noise(x0, eps, tt), tt, {"class_labels": labels})
            loss = edm_loss(unet, x0, labels, sigma.repeat(3), eps, 0.5)
        c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
        torch.testing.assert_close(loss, ((d - x0) ** 2).mean() / c_out**2, rtol=1e-4, atol=1e-5)


def test_checked_in_teacher_is_an_ordinary_small_diffusers_teacher():
    from dmd2.models import load_teacher

    teacher = load_teacher(str(TEACHER), "classcond")
    assert teacher.schedule.kind == "edm" and teacher.num_classes == 10 and teacher.resolution == 8
    assert next(teacher.unet.parameters()).dtype == torch.float32  # fp16 on disk, fp32 loaded
    assert sum(f.stat().st_size for f in TEACHER.rglob("*") if f.is_file()) < 3 * 2**20
    made = json.loads((TEACHER / "digits_teacher.json").read_text())
    assert made["digest"] == TeacherSettings().digest(), "the checked-in teacher was made with other settings"


def test_feature_extractor_follows_the_clean_fid_convention(tmp_path):
    net = classifiers.DigitNet().eval()
    path = tmp_path / "f.pt"
    torch.jit.script(classifiers.FeatureExtractor(net)).save(str(path))
    f = classifiers.load_feature_extractor(path)
    small = torch.full((2, 3, 8, 8), 200.0)
    big = torch.full((2, 3, 299, 299), 200.0)  # what clean-fid passes after its resize
    assert f(small).shape == (2, classifiers.FEATURE_DIM)
    torch.testing.assert_close(f(big), f(small))
    with torch.no_grad():
        torch.testing.assert_close(f(small), net.features(small / 127.5 - 1))


def test_precision_recall_k3():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(500, 4)), rng.normal(size=(500, 4))
    p, r = precision_recall(real, real)
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, fake)
    assert p > 0.8 and r > 0.8
    p, r = precision_recall(real, fake * 0.1)  # collapsed onto the mode: faithful, not diverse
    assert p > 0.95 and r < 0.2
    assert precision_recall(real, fake + 10) == (0.0, 0.0)


# make test-all: the demo pipeline and its report run in the default suite through the digits-t2i
# test below; this class-conditional run (87 s) is make demo's first row in small.
@pytest.mark.slow
def test_demo_student_beats_the_teacher_at_one_call(tmp_path):
    """A short `make demo` (profile "test"): the real CLI trains a 1-step student from the
    checked-in teacher with the GAN on the real digits, dmd2 eval scores both at one call."""
    out = tmp_path / "demo"
    rows = run_demo("test", out, tmp_path / "cache")
    student, teacher = rows["digits", "student_1step", 1], rows["digits", "teacher", 1]
    assert set(student) == {"name", "nfe", "fid", "precision", "recall", "label_accuracy", "images_per_s",
                            "benchmark", "steps"}
    assert student["steps"] == 150 and teacher["steps"] is None
    assert student["fid"] <= 0.5 * teacher["fid"], (student, teacher)
    # the 1-call teacher draws each class's blurry mean (recall 0); the student draws varied digits
    assert student["label_accuracy"] >= 0.8 and student["recall"] > teacher["recall"] + 0.2, (student, teacher)
    floor = rows["digits", "real_heldout", 0]
    assert floor["fid"] < student["fid"] and floor["label_accuracy"] > 0.95
    assert (out / "grid.png").is_file() and (out / "samples" / "digits_student_1step" / "grid.png").is_file()


def test_demo_t2i_student_beats_the_cfg_teacher_at_one_call(tmp_path):
    """digits-t2i end to end (profile "test-t2i"): the SDXL code path (two CLIP encoders, CFG,
    DDPM epsilon in VAE latents, conditioning timestep 399, the GAN on the captioned digits) trains
    a 1-step student from the checked-in text-to-image teacher; scored at 8 x 8 against the teacher
    with CFG at one call, and it draws the prompt's digit."""
    out = tmp_path / "demo"
    rows = run_demo("test-t2i", out, tmp_path / "cache")
    student, teacher = rows["digits-t2i", "student_1step", 1], rows["digits-t2i", "teacher_cfg", 1]
    assert student["fid"] <= 0.5 * teacher["fid"], (student, teacher)
    assert student["label_accuracy"] >= 0.8, student
    assert (out / "samples" / "digits-t2i_student_1step" / "grid.png").is_file()
    # images/s from dmd2 eval's own timing of each draw; the floor row has no sampler
    assert all(0 < r["images_per_s"] < float("inf") for r in (student, teacher)), (student, teacher)
    assert rows["digits-t2i", "real_heldout", 0]["images_per_s"] is None


def test_run_parallel_hands_each_finished_command_to_on_done_and_stops_on_its_error(tmp_path, monkeypatch):
    """The demo scores each eval in the parent as it finishes: in finishing order, after the next
    commands have started; an error there stops the commands still running and is raised."""
    from dmd2.digits.demo import run_parallel

    def cmd(name, after=None):
        return (name, ["--help"], tmp_path / f"{name}.log", after)

    seen = []
    seconds = run_parallel([cmd("a"), cmd("b", after="a"), cmd("c")], jobs=2, on_done=seen.append)
    assert sorted(seen) == ["a", "b", "c"] and seen.index("a") < seen.index("b") and set(seconds) == set(seen)
    assert "Usage: dmd2" in (tmp_path / "b.log").read_text()

    def fail(name):
        raise RuntimeError(f"scoring {name} failed")

    started, popen = {}, subprocess.Popen

    def record(cmd, **kw):  # the commands run_parallel starts, to see what became of them
        proc = started[len(started)] = popen(cmd, **kw)
        return proc

    monkeypatch.setattr(subprocess, "Popen", record)
    with pytest.raises(RuntimeError, match="scoring a failed"):
        run_parallel([cmd("a"), cmd("b", after="a")], jobs=2, on_done=fail)
    # "b" started just before a's scoring failed, and was stopped (SIGTERM) rather than left running
    assert len(started) == 2 and started[1].wait(timeout=30) == -signal.SIGTERM


def test_a_group_runs_its_commands_in_one_process_and_stops_at_the_first_failure(tmp_path):
    """make bench-quality runs each run folder's evals as one group (dmd2.digits.evalgroup): the
    commands in turn through the dmd2 app, in one process; the first that fails ends the group with
    its exit status and the commands after it do not run."""
    from dmd2.digits.demo import run_parallel

    missing = tmp_path / "no-such-run"
    ok = ["eval", "--help"]
    seconds = run_parallel([("g", [ok, ["sample", "--help"]], tmp_path / "g.log")], jobs=1)
    log = (tmp_path / "g.log").read_text()
    assert set(seconds) == {"g"} and log.count("$ dmd2 ") == 2 and "Usage: dmd2 eval" in log and \
        "Usage: dmd2 sample" in log, log
    with pytest.raises(SystemExit, match="exit 2"):
        run_parallel([("bad", [ok, ["eval", str(missing), "--draw-only", "--out", str(tmp_path / "r.json")], ok],
                      tmp_path / "bad.log")], jobs=1)
    log = (tmp_path / "bad.log").read_text()
    assert log.count("$ dmd2 ") == 2 and "error:" in log and str(missing) in log, log


def test_demo_commands_share_the_cores_they_are_given(tmp_path, monkeypatch):
    """Each command's OpenMP threads are the cores divided among the commands that can run: --cores
    (tests under pytest-xdist pass their share), else the CPUs this process may use (its affinity,
    not the machine's count). More threads than free cores made a training 15x slower."""
    from dmd2.digits.demo import run_parallel

    threads, popen = [], subprocess.Popen

    def record(cmd, **kw):
        threads.append(kw["env"]["OMP_NUM_THREADS"])
        return popen(cmd, **kw)

    monkeypatch.setattr(subprocess, "Popen", record)

    def cmds(*names):
        return [(n, ["--help"], tmp_path / f"{n}.log") for n in names]

    run_parallel(cmds("alone"), jobs=2, cores=1)
    run_parallel(cmds("alone"), jobs=2, cores=3)
    run_parallel(cmds("a", "b"), jobs=2, cores=4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    run_parallel(cmds("pinned"), jobs=2)
    assert threads == ["1", "3", "2", "2", "1"]


def test_missing_digits_folder_names_the_command_that_builds_it(tmp_path, monkeypatch):
    from dmd2.data import RealImages
    from dmd2.errors import UserError

    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "runs" / "digits" / "data" / "train"  # where the digits recipes look, under tmp_path
    with pytest.raises(UserError) as e:
        RealImages(missing, 8, labelled=True, num_classes=10)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"data.real_images: {str(missing)!r} is not a folder")
    assert msg.endswith("build it with `python -m dmd2.digits.data runs/digits/data` (make demo builds it too)")
    # the command, as printed, builds it
    cmd = msg.split("`")[1].split()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    assert len(RealImages(missing, 8, labelled=True, num_classes=10).items) == 1437
    # other missing folders get no digits hint, but where to read about the real data
    with pytest.raises(UserError, match=r"is not a folder; docs/data.md says how to make COCO-2014 prompts"):
        RealImages(tmp_path / "photos", 8, labelled=True, num_classes=10)


def test_demo_and_bench_check_their_wall_time_budget():
    """make demo's 10 minutes and make bench-quality's 60 are targets like the FIDs: over budget is
    a miss (exit 1); a rescore or one benchmark's rows (--only) is not the whole run and has none."""
    from dmd2.digits.demo import PROFILES
    from dmd2.digits.report import check_targets

    assert PROFILES["demo"].budget_s == 600 and PROFILES["bench"].budget_s == 3600
    assert check_targets([], "bench", 3700.0, 3600) == [("wall time 61.7 min <= 60 min", False)]
    assert check_targets([], "bench", 3500.0, 3600) == [("wall time 58.3 min <= 60 min", True)]
    assert check_targets([], "demo", 700.0, 600) == [("wall time 11.7 min <= 10 min", False)]
    assert check_targets([], "bench", None, 3600) == [] and check_targets([], "bench", 3700.0, None) == []


def test_prepare_publishes_the_teacher_and_feature_extractor_caches_whole(tmp_path, monkeypatch):
    """demo.prepare's retrained teacher (--train-teacher) and feature extractor are built in a
    folder of the writer's own and renamed into place with a stamp (files.publish_folder): a
    folder a killed run left half-written is rebuilt, a finished one is kept, and an old teacher
    cache whose record matches is not retrained. (Before, both wrote to a fixed .tmp name, which
    two demos preparing at once shared.)"""
    import dmd2.digits.teacher as teacher_mod
    from dmd2.digits import demo

    built = []

    def fake_features(train, heldout, out, epochs, seed):
        built.append("features")
        torch.save({}, out)
        out.with_suffix(".json").write_text(json.dumps({"heldout_accuracy": 0.99, "feature_dim": 4}))
        return out

    def fake_teacher(out, s):
        built.append("teacher")
        (out / "digits_teacher.json").write_text(json.dumps({"settings": "written by train_teacher"}))
        return out

    monkeypatch.setattr(classifiers, "train_feature_extractor", fake_features)
    monkeypatch.setattr(teacher_mod, "train_teacher", fake_teacher)
    cache = tmp_path / "cache"
    p = demo.prepare(tmp_path / "out", cache, train_teacher=True)
    assert built == ["teacher", "features"] and p.features.is_file() and p.teacher.is_dir()
    assert sorted(x.name for x in cache.iterdir()) == sorted(["data", p.teacher.name, p.features.parent.name])
    demo.prepare(tmp_path / "out", cache, train_teacher=True)
    assert built == ["teacher", "features"]  # both kept
    (p.features.parent / "settings.json").unlink()  # as a run killed before its stamp leaves it
    (p.teacher / "digits_teacher.json").write_text(json.dumps(json.loads((p.teacher / "digits_teacher.json")
                                                                         .read_text()), indent=1))
    demo.prepare(tmp_path / "out", cache, train_teacher=True)
    # the features are rebuilt; the teacher whose record matches (as train_teacher writes it, indented) is kept
    assert built == ["teacher", "features", "features"]


def test_bench_starts_its_longest_evals_first():
    """The evals are ordered longest first, as the trainings: the 50-step teachers with CFG (two
    calls a step) before the students' few calls, so none of them runs alone at the end."""
    from dmd2.digits.demo import PROFILES, _eval_cost, eval_plan

    plan = sorted(eval_plan(PROFILES["bench"]), key=_eval_cost, reverse=True)
    first = [(e.student.benchmark, e.row, e.teacher.nfe if e.teacher else None) for e in plan[:4]]
    assert first == [("digits-flow", "teacher_cfg", 50), ("digits-t2i", "teacher_cfg", 50),
                     ("digits-t2i", "teacher_nocfg", 50), ("digits", "teacher", 50)], first
    assert all(e.teacher is None or e.teacher.nfe <= 4 for e in plan[4:])


def test_quarter_checkpoint_is_kept_whatever_the_steps():
    """A 1750-step run saves at 437, 874, 1311, 1748 and its end (dmd2/train.py saves every
    checkpoint_every steps and at max_steps): keep_last must keep all five, or the _quarter eval
    finds no checkpoint at 437."""
    from dmd2.digits.demo import quarter_args

    for steps in (7, 300, 400, 1750, 2000):
        every, keep = (int(a.split("=")[1]) for a in quarter_args(steps))
        saved = [d for d in range(1, steps + 1) if d % every == 0 or d == steps]
        assert every == steps // 4 and saved[-keep:][0] == steps // 4, (steps, saved, keep)
    assert quarter_args(2000) == ["train.checkpoint_every=500", "train.keep_last=4"]
    assert quarter_args(4) == ["train.checkpoint_every=1", "train.keep_last=4"]
    with pytest.raises(ValueError, match="at least 4 steps, not 3"):
        quarter_args(3)
