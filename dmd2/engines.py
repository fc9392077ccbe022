"""The only module that builds DeepSpeed engines (with checkpoint.py, the only ones importing it).

Two engines: the generator, and the critic (frozen teacher + fake score + GAN head).
The DeepSpeed templates in dmd2/ds_configs/ hold ZeRO settings only; batch size, clipping, precision and
stage come from the recipe and are injected here.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from .errors import UserError
from .step import adamw

# What a launcher (deepspeed, torchrun) or an initialised process group sets; a child process that
# must form its own process group starts without them.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def fresh_process_env(**extra) -> dict:
    """os.environ without LAUNCHER_VARS, plus ``extra``: the environment of a child process group."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def use_bf16(precision: str) -> bool:
    """bf16 where the hardware has it, fp32 on CPU (bf16 is ~2.5x slower there)."""
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed, with or without a launcher; returns (rank, world)."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:  # a free port, so concurrent single-process runs do not collide
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm

    if not torch.cuda.is_available():
        # deepspeed compiles a shared-memory all-reduce op (~2 min) on first CPU init that training
        # never needs; gloo does the collectives. The module object must be patched via sys.modules
        # (`import deepspeed.comm.torch as m` resolves to torch itself).
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(seconds=timeout_s), verbose=False)
    return deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()


def ds_config(template: str | Path, *, batch_size: int, grad_clip: float, bf16: bool, zero_stage: int) -> dict:
    """Load a ds_configs template and inject what the recipe owns."""
    path = Path(template)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"train.ds_config: cannot read {str(path)!r}: {e}") from None
    cfg["train_micro_batch_size_per_gpu"] = batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg["gradient_clipping"] = grad_clip
    cfg["bf16"] = {"enabled": bf16}
    cfg["fp16"] = {"enabled": False}
    cfg.setdefault("zero_optimization", {})["stage"] = zero_stage
    if zero_stage < 3:
        cfg["zero_optimization"] = {k: v for k, v in cfg["zero_optimization"].items() if not k.startswith("stage3")}
    if zero_stage == 3:
        # DeepSpeed's "memory efficient linear" swaps torch.nn.functional.linear process-wide for an
        # autograd Function that binds its arguments with inspect.signature on every call (~40 us x
        # ~400 linears an iteration) and saves nothing ZeRO-3 needs: the weights are re-gathered
        # before backward by the module hooks either way. A template may still turn it on.
        cfg["zero_optimization"].setdefault("memory_efficient_linear", False)
    if zero_stage == 3 and not torch.cuda.is_available():
        # stage3 prefetch tracing costs 10-25 s on the first steps and buys nothing on CPU
        cfg["zero_optimization"]["stage3_max_reuse_distance"] = 0
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def build_engine(module: torch.nn.Module, optim_cfg, config: dict, updates: int = 0):
    """A DeepSpeed engine for ``module`` whose trainable parameters get AdamW + linear warmup (and
    cosine decay over ``updates`` optimizer updates when the recipe asks for it).

    The optimizer is a torch AdamW instance, not one declared in the JSON, which DeepSpeed would
    turn into FusedAdam (an ~90 s compile on CPU, no gain for these sizes).
    """
    import deepspeed

    opt, sched = adamw([p for p in module.parameters() if p.requires_grad], optim_cfg, updates)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=config)
    _drop_idle_zero3_hooks(engine)
    return engine


class EngineTrainee:
    """``step.Trainee`` over a DeepSpeed engine. Its ZeRO optimizers skip an update whose global
    gradient norm is not finite, on every rank, and ``was_step_applied`` reports it; the EMA of the
    generator (``ema.ShardedEMA``) follows each applied update."""

    def __init__(self, engine, ema=None):
        self.engine, self.module, self.ema = engine, engine.module, ema

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss):
        self.engine.backward(loss)
        return loss

    def step(self) -> bool:
        self.engine.step()
        applied = self.engine.was_step_applied()
        if applied and self.ema is not None:
            self.ema.update()
        return applied

    def lr(self) -> float:
        return self.engine.get_lr()[0]


def _drop_idle_zero3_hooks(engine) -> int:
    """ZeRO-3 hooks every submodule: fetch its own parameters before forward and backward, release
    them after, and wrap its inputs and outputs in two autograd Functions to find its backward.
    Each hooked call costs ~100-300 us of Python (DeepSpeed binds the Functions' arguments with
    ``inspect.signature`` on every call), which dominates small models. Removed here:

    - the hooks of modules that own no parameters (activations, blocks, attention wrappers: about
      half of a UNet's modules): they have nothing to fetch;
    - the hooks of modules whose own parameters are all *persistent*
      (``stage3_param_persistence_threshold``: norms, biases, small layers), replaced by a cheap
      guard that gathers them again when something partitioned them (ZeRO-3's optimizer step,
      ``GatheredParameters``, checkpoint loading). Gradients do not depend on these hooks (ZeRO-3
      reduces them from per-parameter hooks). Only when the engine's module runs no activation
      checkpointing, or every one of its parameters is persistent: with both checkpointing and
      partitioned parameters, the recomputation of a checkpointed block needs them (a persistent
      ``time_emb_proj`` without hooks made the recomputed conv weights come back released;
      tests/test_engines.py reproduces it).

    The root keeps its hooks (it starts ZeRO-3's step), and so do modules with external or z3-leaf
    parameters. Returns the number of hooks removed."""
    from deepspeed.utils import z3_leaf_module

    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None:  # ZeRO stage 1/2: no module hooks
        return 0
    root = engine.module
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in root.modules())
    persistent_ok = not checkpointed or all(getattr(p, "ds_persist", False) for p in root.parameters())
    idle, guarded = set(), []
    for m in root.modules():
        if m is root or getattr(m, "_external_params", None) or z3_leaf_module(m):
            continue
        own = list(m.parameters(recurse=False))
        if not own or (persistent_ok and all(getattr(p, "ds_persist", False) for p in own)):
            idle |= {id(m._forward_pre_hooks), id(m._forward_hooks)}
            if own:
                guarded.append((m, own))
    dropped = 0
    for hooks in (offload.forward_hooks, offload.backward_hooks):
        keep = []
        for h in hooks:
            if id(h.hooks_dict_ref()) in idle:
                h.remove()
                dropped += 1
            else:
                keep.append(h)
        hooks[:] = keep
    for m, own in guarded:
        offload.forward_hooks.append(m.register_forward_pre_hook(_gather_if_partitioned(own)))
    return dropped


def _gather_if_partitioned(params: list):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    def hook(module, args):
        missing = [p for p in params if p.ds_status is not ZeroParamStatus.AVAILABLE]
        if missing:  # persistent parameters stay gathered from here on, as ZeRO-3 keeps them
            missing[0].all_gather(missing)

    return hook
