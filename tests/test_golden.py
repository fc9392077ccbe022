"""Golden losses (torchtune's habit): each tiny family trains a few steps through the real CLI on CPU
(fp32, one thread) and every logged loss must equal the checked-in list in ``golden/losses.json``.

A change that should not move numerics (a refactor, a rename) must leave this test green without
touching the file. A change that is meant to move them regenerates it on purpose:

    DMD2_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

and says why in its commit message.
"""

import json
import math
import os
from pathlib import Path

import pytest
from helpers import check_run, loss_curve, run_cli

GOLDEN = Path(__file__).parent / "golden" / "losses.json"

# name -> (tiny family, recipe overrides). Together they cover: 1-step text (CFG, GAN, cache),
# 2-step SDXL with backward simulation, class-conditional EDM, and LoRA generator + LoRA fake score
# with conditioning encoded every step (no cache).
RUNS = {
    "sd15": ("sd15", []),
    "sdxl_2step": ("sdxl", []),
    "classcond": ("classcond", []),
    "sd15_lora_nocache": ("sd15", ["model.lora.enabled=true", "model.lora.fake_score=true", "data.cache=false",
                                   "optim.generator.lr=1e-3", "optim.critic.lr=1e-3"]),
}
STEPS = 4


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


@pytest.mark.parametrize("name", list(RUNS))
def test_golden_losses(tmp_path, tiny_teacher, name):
    family, overrides = RUNS[name]
    teacher = tiny_teacher(family)
    run = tmp_path / "run"
    res = run_cli("train", f"recipes/tiny_{family}.yaml", f"model.teacher={teacher}", f"train.max_steps={STEPS}",
                  f"output_dir={run}", *overrides)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_run(run, STEPS, teacher, full_weights=not any("lora" in o for o in overrides))
    got = {str(step): losses for step, losses in loss_curve(run).items()}
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("DMD2_UPDATE_GOLDEN"):
        golden[name] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert name in golden, f"no golden losses for {name}: run with DMD2_UPDATE_GOLDEN=1"
    want = golden[name]
    assert sorted(got) == sorted(want)
    for step, losses in want.items():
        assert set(got[step]) == set(losses), (step, sorted(got[step]), sorted(losses))
        bad = {k: (got[step][k], v) for k, v in losses.items() if not _close(got[step][k], v)}
        assert not bad, f"{name} step {step}: (got, golden) {bad}"
