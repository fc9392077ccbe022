"""Exponential moving average of the generator's weights, sharded exactly like ZeRO's fp32 master.

Each rank averages its own partition of the optimizer's flat fp32 master groups after every
applied generator update, so the EMA costs one more fp32 copy of the *trainable* partition
(adapters only under LoRA) and no collective. Checkpoints hold one file per rank,
``generator/zero_pp_rank_R_ema.pt`` (in the rank's manifest like its other shards), in the layout
DeepSpeed saves the master groups in; ``consolidated`` turns them into full weights with
DeepSpeed's own zero_to_fp32 merge, so sample/eval/export read the EMA as they read the weights.

Our own because DeepSpeed's engines keep no EMA, and an EMA of the module's parameters would
have to gather every ZeRO-3 weight at each update.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError

FILE = "zero_pp_rank_{rank}_ema.pt"


def _stage(opt) -> int:
    return 3 if hasattr(opt, "fp32_partitioned_groups_flat") else 2


def _master(opt) -> list[torch.Tensor]:
    """This rank's flat fp32 master groups, padded, as the optimizer updates them in place."""
    if _stage(opt) == 3:
        return opt.fp32_partitioned_groups_flat
    return opt.single_partition_of_fp32_groups


def warmed_decay(decay: float, n: int) -> float:
    """The decay used at the n-th update (1-based): min(decay, n / (n + 9)), the warm-up of
    diffusers' EMAModel, so the average forgets its start (the teacher's weights) after a few
    dozen updates instead of carrying decay**n of it (5% after 300 updates at 0.99)."""
    return min(decay, n / (n + 9))


class ShardedEMA:
    def __init__(self, engine, decay: float):
        self.opt, self.decay, self.updates = engine.optimizer, decay, 0
        self.ema = [m.detach().clone() for m in _master(self.opt)]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = warmed_decay(self.decay, self.updates)
        for e, m in zip(self.ema, _master(self.opt), strict=True):
            e.lerp_(m.to(e.device), 1.0 - d)

    def _saved_form(self) -> list[torch.Tensor]:
        # ZeRO-1/2 save their groups without the alignment padding; zero_to_fp32 expects that
        if _stage(self.opt) == 3:
            return [e.cpu() for e in self.ema]
        return [e.cpu() for e in self.opt._get_groups_without_padding(self.ema)]

    def save(self, folder: Path, rank: int) -> None:
        path = folder / FILE.format(rank=rank)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"decay": self.decay, "updates": self.updates, "groups": self._saved_form()}, tmp)
        os.replace(tmp, path)

    @torch.no_grad()
    def load(self, folder: Path, rank: int) -> None:
        path = folder / FILE.format(rank=rank)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        groups = saved["groups"]
        if len(groups) != len(self.ema):
            raise UserError(f"{path}: {len(groups)} EMA groups, the generator has {len(self.ema)}")
        # files written before the warm-up existed averaged at the full decay all along
        self.updates = saved.get("updates", 10**9)
        for e, g in zip(self.ema, groups, strict=True):
            e.view(-1)[: g.numel()].copy_(g.view(-1))


def consolidated(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 EMA weights from a checkpoint's ``generator/`` folder (keys as the engine's module)."""
    from deepspeed.utils import zero_to_fp32 as z

    d = str(folder)
    states = z.parse_model_states(z.get_model_state_files(d))
    stage, world, _, paddings = z.parse_optim_states(z.get_optim_files(d), d)
    groups = [torch.load(folder / FILE.format(rank=r), map_location="cpu", weights_only=True)["groups"]
              for r in range(world)]
    if stage <= 2:
        sd = z._get_fp32_state_dict_from_zero2_checkpoint(world, groups, states, False, paddings)
    else:
        sd = z._get_fp32_state_dict_from_zero3_checkpoint(world, groups, states, False)
    return z.to_torch_tensor(sd)
