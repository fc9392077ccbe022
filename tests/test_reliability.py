"""Never lose a run: exact resume, kill -9 inside saves, corrupt checkpoints, preemption, NaN guard,
lost ranks. Every run goes through the real CLI (and the deepspeed launcher for 2 ranks); faults
are injected with DMD2_FAULT (dmd2/faults.py)."""

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, cli_cmd, cli_env, loss_curve, metrics, run_cli

from dmd2 import checkpoint

STEPS = 10


def _train_args(teacher, run, steps=STEPS, *extra):
    return ["train", "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", f"output_dir={run}",
            f"train.max_steps={steps}", "train.checkpoint_every=2", "train.keep_last=2", *extra]


def _ok(res):
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _tensors_equal(a, b, path=""):
    """Recursive bitwise comparison of two loaded checkpoint objects; returns the first difference."""
    if isinstance(a, torch.Tensor):
        return None if isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b) else path
    if isinstance(a, dict):
        if set(a) != set(b):
            return f"{path} keys"
        for k in a:
            if k in ("ds_config", "ds_version"):
                continue
            diff = _tensors_equal(a[k], b[k], f"{path}.{k}")
            if diff:
                return diff
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path} len"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = _tensors_equal(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None
    if hasattr(a, "__dict__") and type(a) is type(b):  # e.g. DeepSpeed's loss scaler object
        return _tensors_equal(vars(a), vars(b), path)
    return None if a == b or (a != a and b != b) else path


def _drop_padding(optim_file: Path, state: dict) -> None:
    """ZeRO pads the last rank's flat fp32 partition to equal size; the pad is uninitialised
    memory (different in every process), so compare only the real parameters."""
    rank = int(optim_file.name.split("_")[3])
    shapes = torch.load(optim_file.with_name(optim_file.name.replace("optim_states", "model_states")),
                        map_location="cpu", weights_only=False)["param_shapes"]
    total = sum(s.numel() for group in shapes for s in group.values())
    flat = state["optimizer_state_dict"]["fp32_flat_groups"]
    part = sum(f.numel() for f in flat)
    real = max(0, min(part, total - rank * part))
    state["optimizer_state_dict"]["fp32_flat_groups"] = [torch.cat([f.flatten() for f in flat])[:real]]


def assert_same_state(ck_a: Path, ck_b: Path):
    """Both engines' weights, Adam moments, LR schedules and step counters are bitwise equal."""
    for tag in checkpoint.TAGS:
        files = sorted(p.name for p in (ck_a / tag).iterdir())
        assert files == sorted(p.name for p in (ck_b / tag).iterdir())
        for name in files:
            a = torch.load(ck_a / tag / name, map_location="cpu", weights_only=False)
            b = torch.load(ck_b / tag / name, map_location="cpu", weights_only=False)
            if "optim_states" in name:
                _drop_padding(ck_a / tag / name, a)
                _drop_padding(ck_b / tag / name, b)
            diff = _tensors_equal(a, b, f"{tag}/{name}")
            assert diff is None, f"differs at {diff}"


def assert_same_curve(run, ref, from_step=1):
    got, want = loss_curve(run), loss_curve(ref)
    assert sorted(got) == sorted(want)
    for step in range(from_step, max(want) + 1):
        assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"  # bitwise (fp32 CPU)


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher("sd15")


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _ok(run_cli(*_train_args(teacher, run)))
    return run


def test_resume_between_generator_updates_is_exact(teacher, reference, tmp_path):
    """3 steps, exit, same command with max_steps=10: step 3 lies between generator updates
    (update_ratio 2), so the resumed run must re-enter the two time-scale cycle mid-way."""
    run = tmp_path / "run"
    _ok(run_cli(*_train_args(teacher, run, 3)))
    res = _ok(run_cli(*_train_args(teacher, run)))
    assert "resumed from" in res.stdout and "step_00000003" in res.stdout
    assert_same_curve(run, reference)
    assert_same_state(checkpoint.latest(run), checkpoint.latest(reference))


def test_kill_9_at_every_point_of_a_save(teacher, reference, tmp_path):
    """SIGKILL after the generator's shards, after the critic shards, before the commit marker,
    after it (before rotation), and in the middle of rotation; each re-run resumes from the newest
    complete checkpoint and the end result equals the uninterrupted run."""
    run = tmp_path / "run"
    chain = ["save_after_generator@2", "save_after_critic@4", "save_before_commit@6",
             "save_after_commit@6", "rotate_after_uncommit@8"]
    for point in chain:
        res = run_cli(*_train_args(teacher, run), fault=f"kill:{point}")
        assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stderr[-2000:])
        for d in (run / "checkpoints").iterdir():  # only complete or clearly invalid folders
            assert checkpoint.is_committed(d) or not (d / checkpoint.COMMIT).exists()
    _ok(run_cli(*_train_args(teacher, run)))
    assert_same_curve(run, reference)
    assert_same_state(checkpoint.latest(run), checkpoint.latest(reference))
    left = sorted(d.name for d in (run / "checkpoints").iterdir())
    assert left == ["step_00000008", "step_00000010"]  # keep_last=2, partial folders cleaned


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard(ckpt: Path) -> Path:
    return ckpt / "critic" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "missing_shard", "missing_manifest", "no_commit"])
def test_corrupt_checkpoint_is_detected(reference, tmp_path, damage):
    ckpt = _copy_ckpt(checkpoint.latest(reference), tmp_path / "ck")
    checkpoint.verify(ckpt)  # intact: verifies
    shard = _shard(ckpt)
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flipped_byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        torch.load(shard, weights_only=False)  # torch itself loads it without complaint
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "missing_manifest":
        (ckpt / "manifest.rank0.json").unlink()
    else:
        (ckpt / checkpoint.COMMIT).unlink()
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.verify(ckpt)
    msg = str(e.value)
    assert "\n" not in msg
    assert ("manifest" in msg) if damage == "missing_manifest" else \
        ("not committed" in msg) if damage == "no_commit" else (shard.name in msg)


def test_auto_resume_falls_back_and_explicit_resume_refuses(teacher, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = checkpoint.latest(run)
    data = bytearray(_shard(newest).read_bytes())
    data[len(data) // 3] ^= 0x10
    _shard(newest).write_bytes(bytes(data))

    explicit = run_cli(*_train_args(teacher, run, STEPS, f"train.resume_from={newest}"))
    assert explicit.returncode == 2
    lines = explicit.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.resume_from" in lines[0] and _shard(newest).name in lines[0], explicit.stderr

    res = _ok(run_cli(*_train_args(teacher, run, STEPS)))
    assert "warning: skipping checkpoint" in res.stdout and "checksum mismatch" in res.stdout
    assert "resumed from" in res.stdout and "step_00000008" in res.stdout
    assert_same_curve(run, reference)
    assert_same_state(checkpoint.latest(run), checkpoint.latest(reference))


def test_checkpoint_from_before_the_critic_rename_resumes_exactly(teacher, reference, tmp_path):
    """Checkpoints written before 0.2 hold the critic engine in guidance/: they still resume."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(checkpoint.latest(run))
    old = checkpoint.latest(run)
    (old / "critic").rename(old / "guidance")
    for manifest in old.glob("manifest.rank*.json"):
        files = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({k.replace("critic/", "guidance/", 1): v for k, v in files.items()}))
    checkpoint.verify(old)
    res = _ok(run_cli(*_train_args(teacher, run)))
    assert "resumed from" in res.stdout and old.name in res.stdout
    assert_same_curve(run, reference)
    assert_same_state(checkpoint.latest(run), checkpoint.latest(reference))


@pytest.mark.slow  # 35 s; make reliability runs it (external SIGTERM: test_external_sigterm_exits_within_seconds)
def test_sigterm_mid_save_and_mid_step_saves_and_exits_0(teacher, reference, tmp_path):
    run = tmp_path / "run"
    res = _ok(run_cli(*_train_args(teacher, run), fault="term:save_after_generator@2"))
    assert "preempted: saved step 3" in res.stdout
    res = _ok(run_cli(*_train_args(teacher, run), fault="term:step_begin@5"))
    assert "preempted: saved step 5" in res.stdout
    _ok(run_cli(*_train_args(teacher, run)))
    assert_same_curve(run, reference)
    assert_same_state(checkpoint.latest(run), checkpoint.latest(reference))


def test_external_sigterm_exits_within_seconds(teacher, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(cli_cmd(*_train_args(teacher, run, 10_000)), cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").exists() and metrics(run)) and time.time() < deadline:
            time.sleep(0.2)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        elapsed = time.time() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert elapsed < 30, elapsed
    last = checkpoint.latest(run)
    assert last is not None and checkpoint.read_state(last)["step"] == metrics(run)[-1]["step"]


def _weights(ckpt, tag):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_or_gradient_never_reaches_the_weights(teacher, tmp_path):
    """NaN in the generator loss (step 3), the critic loss (step 4), the gradient reaching the
    generator's output (step 5): each step is skipped, counted, and leaves the weights as they were."""
    run = tmp_path / "run"
    fault = "nan:loss_generator@3,nan:loss_critic@4,nan:grad_generator@5"
    res = _ok(run_cli(*_train_args(teacher, run, 5, "train.checkpoint_every=1", "train.keep_last=10"), fault=fault))
    assert "skipped steps 3" in res.stdout
    rows = {r["step"]: r for r in metrics(run)}
    assert [rows[s]["skipped"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert rows[3]["loss_generator"] != rows[3]["loss_generator"]  # NaN is logged as it was
    ck = {checkpoint.read_state(c)["step"]: c for c in checkpoint.committed(run)}
    gen = {s: _weights(ck[s], "generator") for s in (2, 3, 4, 5)}
    guid = {s: _weights(ck[s], "critic") for s in (3, 4)}
    assert _same(gen[2], gen[3]) and _same(gen[3], gen[4]) and _same(gen[4], gen[5])
    assert _same(guid[3], guid[4])
    for sd in (*gen.values(), *guid.values()):
        assert all(torch.isfinite(v).all() for v in sd.values())


def test_consecutive_nan_steps_stop_the_run(teacher, tmp_path):
    run = tmp_path / "run"
    res = run_cli(*_train_args(teacher, run, 6, "train.max_bad_steps=2", "train.checkpoint_every=1"),
                  fault="nan:loss_critic@2,nan:loss_critic@3")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert "step 3: 2 consecutive steps with non-finite" in lines[-1] and "loss_critic=nan" in lines[-1]
    assert "step_00000002" in lines[-1]  # the last good checkpoint is named and kept
    assert checkpoint.read_state(checkpoint.latest(run))["step"] == 2


# make reliability (52 s): two ranks are in the default suite through test_a_dead_rank_stops_the_others_with_a_message
@pytest.mark.slow
def test_two_ranks_sigterm_to_one_rank_and_exact_resume(teacher, tmp_path_factory):
    """SIGTERM to rank 1 only: both ranks save and exit 0; the resumed 2-rank run equals an
    uninterrupted 2-rank run bitwise."""
    root = tmp_path_factory.mktemp("two")
    ref, run = root / "ref", root / "run"
    _ok(run_cli(*_train_args(teacher, ref, 4), ranks=2))
    res = _ok(run_cli(*_train_args(teacher, run, 4), ranks=2, fault="term:step_begin@2/1"))
    assert "preempted: saved step 2" in res.stdout
    assert checkpoint.read_state(checkpoint.latest(run))["step"] == 2
    _ok(run_cli(*_train_args(teacher, run, 4), ranks=2))
    assert_same_curve(run, ref)
    assert_same_state(checkpoint.latest(run), checkpoint.latest(ref))


@pytest.mark.slow  # 20 s; under 15 minutes (make reliability)
def test_a_dead_rank_stops_the_others_with_a_message(teacher, tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    res = run_cli(*_train_args(teacher, run, 6, "train.collective_timeout_s=60"), ranks=2,
                  fault="kill:step_begin@3/1", timeout=300)
    assert res.returncode != 0
    assert time.time() - t0 < 120
    assert "lost contact with the other ranks" in res.stdout + res.stderr


@pytest.mark.slow
def test_a_hung_rank_times_out(teacher, tmp_path):
    run = tmp_path / "run"
    res = run_cli(*_train_args(teacher, run, 6, "train.collective_timeout_s=15"), ranks=2,
                  fault="hang:step_begin@3/1", timeout=300)
    assert res.returncode != 0
    assert "lost contact with the other ranks" in res.stdout + res.stderr


@pytest.mark.slow
def test_random_kill_soak(teacher, reference, tmp_path):
    """kill -9 at random moments until the run completes; the curve equals the reference."""
    run = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    for _ in range(30):
        proc = subprocess.Popen(cli_cmd(*_train_args(teacher, run)), cwd=REPO, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(6, 16))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
            continue
        if proc.returncode == 0 and checkpoint.latest(run) and checkpoint.read_state(checkpoint.latest(run))["step"] == STEPS:
            break
    print(f"kills survived: {kills}")
    assert kills >= 1
    assert_same_curve(run, reference)
    assert_same_state(checkpoint.latest(run), checkpoint.latest(reference))
