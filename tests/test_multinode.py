"""Multi-node shown working on one machine: `dmd2 train` as two nodes of one rank each, started the
way a scheduler (SLURM) does, one deepspeed launcher per node with --no_ssh and --node_rank."""

import json

import pytest
from helpers import check_run, metrics, run_two_nodes


@pytest.mark.slow
def test_train_two_nodes_resumes_with_both_ranks_shards(tmp_path, tiny_teacher):
    from dmd2.checkpoint import verify

    teacher = tiny_teacher("sdxl")
    run = tmp_path / "run"
    args = ["train", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", f"output_dir={run}", "train.seed=1",
            "train.checkpoint_every=2"]

    nodes = run_two_nodes(tmp_path, *args, "train.max_steps=2")
    for rc, out in nodes:
        assert rc == 0, out[-4000:]
    for r, (_, out) in enumerate(nodes):  # two launchers, each one node of a 2-node world
        assert f"nnodes=2, num_local_procs=1, node_rank={r}" in out and "dist_world_size=2" in out, out[-4000:]
    assert [row["step"] for row in metrics(run)] == [1, 2]
    assert "done: 2 steps" in nodes[0][1]  # rank 0 (node 0) logs

    # the same two commands, longer: both nodes resume from step 2, not from 0
    nodes = run_two_nodes(tmp_path, *args, "train.max_steps=4")
    for rc, out in nodes:
        assert rc == 0, out[-4000:]
    assert f"resumed from {run / 'checkpoints/step_00000002'} at step 2" in nodes[0][1], nodes[0][1][-4000:]
    check_run(run, 4, teacher)  # metrics 1..4 once each: steps 1-2 were not run again

    # the committed checkpoint holds both ranks' ZeRO shards, each listed in its rank's manifest
    last = run / "checkpoints/step_00000004"
    assert verify(last)["world_size"] == 2  # every file's size and sha256, both manifests
    for tag in ("generator", "critic"):
        for r in (0, 1):
            for kind in ("model", "optim"):
                assert (last / tag / f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt").is_file()
    for r in (0, 1):
        manifest = json.loads((last / f"manifest.rank{r}.json").read_text())
        assert any(name.startswith("generator/zero_pp_rank_" + str(r)) for name in manifest)
        assert any(name.startswith("critic/zero_pp_rank_" + str(r)) for name in manifest)
