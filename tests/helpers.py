"""Shared by the tests that run the real CLI in subprocesses."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
def cli_env(**extra) -> dict:
    """A fresh process group: drop what an in-process engine test left in os.environ."""
    from dmd2.engines import fresh_process_env

    env = fresh_process_env()
    env.pop("DMD2_FAULT", None)
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli_cmd(*args, ranks=1) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "dmd2", *map(str, args)]
    launcher = Path(sys.executable).parent / "deepspeed"
    # a port free now, not one derived from the pid: two pytest-xdist workers start launchers at once
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "dmd2", *map(str, args)]


def run_cli(*args, ranks=1, timeout=600, fault=None, **env):
    extra = {"DMD2_FAULT": fault} if fault else {}
    return subprocess.run(cli_cmd(*args, ranks=ranks), cwd=REPO, env={**cli_env(**env), **extra},
                          capture_output=True, text=True, timeout=timeout)


def run_demo(profile: str, out: Path, cache: Path) -> dict:
    """``python -m dmd2.digits.demo --profile PROFILE`` through the CLI on this test's share of the
    cores; its report's rows by (benchmark, name, nfe). Under pytest-xdist the other workers'
    subprocesses run beside it, and a 2-thread training beside one busy core ran 15x slower than
    alone (README "The main job on CPU"), so the demo gets the cores divided by the workers."""
    from dmd2.digits.demo import available_cores

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = max(1, available_cores() // workers)
    res = subprocess.run([sys.executable, "-m", "dmd2.digits.demo", "--profile", profile, "--out", str(out),
                          "--cache", str(cache), "--cores", str(cores)],
                         cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return {(r["benchmark"], r["name"], r["nfe"]): r for r in json.loads((Path(out) / "report.json").read_text())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_cmds(hostfile: Path, port: int, *args) -> list[list[str]]:
    """One deepspeed launcher per node, without ssh (what a scheduler such as SLURM starts on
    each node): the same hostfile and master on both, only --node_rank differs."""
    launcher = Path(sys.executable).parent / "deepspeed"
    return [[str(launcher), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
             "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", "dmd2", *map(str, args)]
            for r in (0, 1)]


def run_two_nodes(workdir: Path, *args, timeout=600, **env) -> list[tuple[int, str]]:
    """``dmd2 *args`` as two nodes of one rank each on this machine: two launchers, each in its own
    process group. Returns (exit status, output) per node; when a node fails, or at the timeout,
    the other's whole process group is killed (a peer left waiting in a collective would hang)."""
    hostfile = Path(workdir) / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names need not resolve with --no_ssh
    port = free_port()
    procs, logs = [], []
    try:
        for cmd in two_node_cmds(hostfile, port, *args):
            logs.append(tempfile.TemporaryFile("w+"))
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=cli_env(**env), stdout=logs[-1],
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    out = []
    for p, log in zip(procs, logs, strict=True):
        log.seek(0)
        out.append((p.returncode, log.read()))
        log.close()
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def loss_curve(run: Path) -> dict[int, dict]:
    """step -> losses of the last time that step ran (a resumed run re-runs lost steps)."""
    out = {}
    for row in metrics(run):
        out[row["step"]] = {k: v for k, v in row.items() if "loss" in k or k in ("k", "skipped")}
    return out


def _generator_weights(ckpt):
    from dmd2.checkpoint import consolidated_generator

    return consolidated_generator(ckpt)


def check_run(run, steps, teacher, full_weights=True):
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        losses = {k: v for k, v in r.items() if "loss" in k}
        assert "loss_critic" in losses and all(math.isfinite(v) for v in losses.values())
    assert any("loss_dm" in r for r in rows) and any("loss_gan_d" in r for r in rows)
    assert (run / "recipe.yaml").is_file()
    ckpts = sorted((run / "checkpoints").iterdir())
    last = ckpts[-1]
    assert (last / "COMMITTED").is_file() and (last / "generator").is_dir() and (last / "critic").is_dir()
    assert json.loads((last / "state.json").read_text())["step"] == steps
    if not full_weights:  # a LoRA run's checkpoint holds adapters, not the UNet's keys
        return
    # the generator moved away from the teacher; the teacher on disk is untouched
    import torch
    from safetensors.torch import load_file

    weights = _generator_weights(last)
    denoiser = teacher / ("transformer" if (teacher / "transformer").is_dir() else "unet")  # SD3: transformer/
    ref = load_file(str(next(denoiser.glob("*.safetensors"))))
    assert set(weights) == set(ref)
    assert any(not torch.equal(weights[k], ref[k]) for k in ref)


def cli_error(*args) -> str:
    """Run a command in-process; it must fail with exit status 2 and one line on stderr."""
    from typer.testing import CliRunner

    from dmd2.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def sample_and_export_flow_run(run: Path, tmp_path: Path, family: str, prompts: list[str], seeds: list[int]):
    """What the SD3 and FLUX export tests share: `dmd2 sample` of a 2-step run at 32 px draws at its
    timesteps; `dmd2 export --pipeline` writes a diffusers pipeline folder with a stochastic
    FlowMatchEuler scheduler, read back by dmd2 to draw what the run draws. Returns (dmd2.json, the
    pipeline, the run's student, ours(timesteps): the run's images for ``prompts`` / ``seeds``)."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    from PIL import Image

    from dmd2.generate import draw
    from dmd2.models.student import load_student

    out = tmp_path / "samples"
    run_cli("sample", run, "--prompt", prompts[0], "--prompt", prompts[1], "--seed", seeds[0], "--out", out)
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [r["timesteps"] for r in rows] == [[999, 499]] * 2
    assert np.array(Image.open(out / "000000.png")).shape == (32, 32, 3)

    exp = tmp_path / "pipe"
    res = run_cli("export", run, "--pipeline", "--out", exp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    meta = json.loads((exp / "dmd2.json").read_text())
    assert (meta["family"], meta["timesteps"], meta["weights"], meta["schedule"]["kind"]) == (
        family, [999, 499], "transformer", "flow")
    pipe = DiffusionPipeline.from_pretrained(exp)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.stochastic_sampling
    pipe.set_progress_bar_config(disable=True)
    gen = load_student(run)

    def ours(ts, student=gen):
        return torch.cat([x for _, x in draw(student, prompts, seeds, ts, range(2), 2)]).clamp(-1, 1)

    # dmd2 reads the export back, and draws what the run draws
    again = load_student(exp)
    assert (ours([999, 499], again) - ours([999, 499])).abs().max() < 1e-5
    return meta, pipe, again, ours


def lora_1step_flow_run(tmp_path: Path, teacher: Path, recipe: str, feature_layer: int, prompts: list[str]) -> Path:
    """What the SD3 and FLUX LoRA tests share: 1 step, LoRA generator and LoRA fake score on the
    teacher's frozen transformer, its own gradient checkpointing, the GAN head on block
    ``feature_layer``; it trains under ZeRO-3 and the merged student draws. Returns the run."""
    import torch

    from dmd2.generate import draw
    from dmd2.models.student import load_student

    run = tmp_path / "run"
    res = run_cli("train", recipe, f"model.teacher={teacher}", "train.max_steps=2", f"output_dir={run}",
                  "generator.num_steps=1", "generator.timesteps=null", "model.lora.enabled=true",
                  "model.lora.fake_score=true", "model.lora.rank=4", "train.gradient_checkpointing=true",
                  f"loss.gan.feature_layer={feature_layer}", "optim.generator.lr=1e-2", "optim.critic.lr=1e-3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_run(run, 2, teacher, full_weights=False)
    gen = load_student(run)
    assert not any("lora" in n for n, _ in gen.parts.unet.named_parameters())  # merged
    x = torch.cat([x for _, x in draw(gen, prompts, [0, 1], [999], range(2), 2)])
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
    return run
