"""`dmd2 eval RUN --all-checkpoints [--watch]`: every committed checkpoint scored once, in step
order, into RUN/eval/; resumable; a checkpoint rotated away mid-score is skipped with one line.

One tiny class-conditional run (4 steps, checkpoints at 2 and 4) is trained once; each test scores
a copy of it with a tiny TorchScript feature extractor against the tiny reference images.
"""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
from helpers import REPO, cli_error, run_cli

TINY_IMAGES = REPO / "recipes" / "data" / "tiny_images"
REMOVED = "step 2: checkpoint removed while being scored (train.keep_last); skipped"


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_teacher) -> Path:
    run = tmp_path_factory.mktemp("runs") / "cc"
    res = run_cli("train", "recipes/tiny_classcond.yaml", f"model.teacher={tiny_teacher('classcond-edm')}",
                  "train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=3", f"output_dir={run}", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run (tests add eval/ and move checkpoints)."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _flags(extractor_file, tmp_path) -> list:
    return ["--fid", "--ref-dir", TINY_IMAGES, "--feature-extractor", extractor_file, "--num-images", 4,
            "--stats-cache", tmp_path / "stats", "--quiet"]


def _kwargs(extractor_file, tmp_path) -> dict:
    return dict(fid=True, ref=TINY_IMAGES, feature_extractor=extractor_file, num_images=4,
                stats_cache=tmp_path / "stats")


def test_all_checkpoints_in_step_order_resumes_and_matches_plain_eval(run, tmp_path, extractor_file):
    from dmd2.evaluate import eval_rows

    flags = _flags(extractor_file, tmp_path)
    res = run_cli("eval", run, "--all-checkpoints", *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["step 2", "step 4"] and len(lines) == 3, res.stdout
    rows = eval_rows(run)
    assert [list(r) for r in rows] == [["step", "fid"], ["step", "fid"]] and [r["step"] for r in rows] == [2, 4]
    for row in rows:
        report = json.loads((run / "eval" / f"step_{row['step']:08d}.json").read_text())
        assert report["step"] == row["step"] and report["metrics"] == [{"name": "fid", "value": row["fid"]}]
        assert report["checkpoint"].endswith(f"checkpoints/step_{row['step']:08d}")
    best = min(rows, key=lambda r: r["fid"])
    assert lines[2].startswith(f"best of 2 checkpoints by fid: step {best['step']}, fid {best['fid']:.6g} ")

    # a re-run (here with --watch: the final step is scored already, so it returns at once) scores nothing new
    res = run_cli("eval", run, "--all-checkpoints", "--watch", "--poll-s", 0.1, *flags, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines() == lines[2:]
    assert eval_rows(run) == rows

    # plain eval (unchanged) scores the newest checkpoint: the same FID as step 4's row
    res = run_cli("eval", run, *flags, "--out", tmp_path / "plain.json")
    assert res.returncode == 0, res.stderr[-3000:]
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["step"] == 4 and plain["metrics"][0]["value"] == rows[1]["fid"] and "checkpoint" not in plain


def test_watch_polls_until_the_final_step_is_scored(run, tmp_path, extractor_file, monkeypatch):
    """Started before the final checkpoint exists: scores step 2, waits, then scores step 4 and exits."""
    from dmd2 import evaluate

    hidden = tmp_path / "not_yet_saved"
    (run / "checkpoints" / "step_00000004").rename(hidden)
    sleeps = []

    def sleep(s):  # training saves its final checkpoint while the evaluator waits
        sleeps.append(s)
        assert len(sleeps) == 1, "polled again after the final checkpoint appeared"
        hidden.rename(run / "checkpoints" / "step_00000004")

    monkeypatch.setattr(evaluate.time, "sleep", sleep)
    lines = []
    rows = evaluate.evaluate_all(run, watch=True, poll_s=0.5, echo=lines.append, **_kwargs(extractor_file, tmp_path))
    assert sleeps == [0.5]
    assert [r["step"] for r in rows] == [2, 4] and [line.split(":")[0] for line in lines] == ["step 2", "step 4"]


def test_checkpoint_rotated_away_while_scored_is_skipped(run, tmp_path, extractor_file, monkeypatch):
    """Rotation (checkpoint.save -> _invalidate) removes step 2 while its weights load: one line, move on."""
    from dmd2 import checkpoint, evaluate

    real = checkpoint.consolidated_generator
    logged = []

    def rotate_then_load(ckpt, ema=False):
        if ckpt.name == "step_00000002":
            checkpoint._invalidate(ckpt)  # what train.keep_last does to old checkpoints, mid-load here
        return real(ckpt, ema)

    monkeypatch.setattr(checkpoint, "consolidated_generator", rotate_then_load)
    monkeypatch.setattr(evaluate, "_log_wandb", lambda run_dir, report, step_axis=False: logged.append(
        (run_dir, report["step"], step_axis)))
    lines = []
    rows = evaluate.evaluate_all(run, echo=lines.append, **_kwargs(extractor_file, tmp_path))
    assert lines[0] == REMOVED and lines[1].startswith("step 4: fid ") and len(lines) == 2
    assert [r["step"] for r in rows] == [4] and logged == [(run, 4, True)]
    assert sorted(p.name for p in (run / "eval").glob("step_*.json")) == ["step_00000004.json"]

    # a checkpoint that fails to load but is still committed is a real error, not a rotation
    def broken(ckpt, ema=False):
        raise RuntimeError("corrupt shard")

    (run / "eval" / "eval.jsonl").unlink()
    monkeypatch.setattr(checkpoint, "consolidated_generator", broken)
    with pytest.raises(RuntimeError, match="corrupt shard"):
        evaluate.evaluate_all(run, echo=lines.append, **_kwargs(extractor_file, tmp_path))


def test_wandb_resumes_the_run_and_logs_on_the_step_axis(trained, tmp_path, monkeypatch):
    from dmd2.evaluate import _log_wandb

    calls = []

    class FakeRun:
        summary = {}

        def define_metric(self, *args, **kwargs):
            calls.append(("define_metric", args, kwargs))

        def log(self, values, **kwargs):
            calls.append(("log", values, kwargs))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    folder = tmp_path / "r"
    folder.mkdir()
    recipe = (trained / "recipe.yaml").read_text()
    (folder / "recipe.yaml").write_text(recipe)
    report = {"metrics": [{"name": "fid", "value": 1.5}], "step": 4}
    _log_wandb(folder, report, step_axis=True)
    assert calls == []  # no wandb_id.txt: the run never logged to wandb
    (folder / "wandb_id.txt").write_text("abc123\n")
    _log_wandb(folder, report, step_axis=True)
    assert calls == []  # logging.wandb.mode: disabled
    assert "mode: disabled" in recipe
    (folder / "recipe.yaml").write_text(recipe.replace("mode: disabled", "mode: offline"))
    _log_wandb(folder, report, step_axis=True)
    assert calls[0][0] == "init" and calls[0][1]["id"] == "abc123" and calls[0][1]["resume"] == "allow"
    assert ("define_metric", ("eval/*",), {"step_metric": "eval/step"}) in calls
    assert ("log", {"eval/fid": 1.5, "eval/step": 4}, {}) in calls and calls[-1] == ("finish",)


def test_one_line_errors(trained, tmp_path):
    flags = ["--fid", "--ref-dir", TINY_IMAGES]
    assert "--all-checkpoints needs a run folder" in cli_error("eval", tmp_path, "--all-checkpoints", *flags)
    export = tmp_path / "export"
    export.mkdir()
    (export / "dmd2.json").write_text("{}")
    assert "--all-checkpoints needs a run folder" in cli_error("eval", export, "--all-checkpoints", *flags)
    assert "pass it with --all-checkpoints" in cli_error("eval", trained, "--watch", *flags)
    assert "drop --out" in cli_error("eval", trained, "--all-checkpoints", "--out", tmp_path / "r.json", *flags)
    assert "--teacher" in cli_error("eval", trained, "--all-checkpoints", "--teacher", *flags)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(trained / "recipe.yaml", empty / "recipe.yaml")
    assert "no committed checkpoint to score" in cli_error("eval", empty, "--all-checkpoints", *flags)


def test_a_second_evaluator_on_the_same_run_is_refused(run, tmp_path):
    """Two --all-checkpoints on one run would score the same checkpoints and write their rows twice."""
    from dmd2.runlock import RunLock

    with RunLock(run / "eval", holder="dmd2 eval --all-checkpoints"):
        msg = cli_error("eval", run, "--all-checkpoints", "--fid", "--ref-dir", TINY_IMAGES)
    assert "eval is in use by another dmd2 eval --all-checkpoints (pid" in msg and str(run) in msg
    assert not (run / "eval" / "eval.jsonl").exists()
