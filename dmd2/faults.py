"""Fault injection for the reliability tests, driven by the DMD2_FAULT environment variable.

``DMD2_FAULT="kill:save_before_commit@4,nan:loss_critic@2"`` — comma-separated
``action:point@step[/rank]`` items:

- ``kill``: SIGKILL this process at a named point (kill -9, nothing is flushed or cleaned);
- ``nan``: make a named value non-finite (a loss, or ``grad_generator``: the gradient that
  reaches the generator's output);
- ``term``: send this process SIGTERM at the point (preemption mid-step or mid-save);
- ``hang``: sleep forever at the point (a rank that hangs rather than dies);
- ``enospc``: raise ``OSError(ENOSPC)`` at the point, as a write to a full disk does.

Unset (the normal case) every check is a dictionary lookup on an empty dict.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import torch

_STEP: int | None = None
_RANK = int(os.environ.get("RANK", "0"))


def _parse(spec: str) -> dict[tuple[str, str], list[tuple[int | None, int | None]]]:
    out: dict[tuple[str, str], list[tuple[int | None, int | None]]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, rest = item.partition(":")
        point, _, when = rest.partition("@")
        step, _, rank = when.partition("/")
        out.setdefault((action, point), []).append((int(step) if step else None, int(rank) if rank else None))
    return out


_FAULTS = _parse(os.environ.get("DMD2_FAULT", ""))


def set_step(step: int) -> None:
    """The training loop tells which step (1-based, the one being run) faults refer to."""
    global _STEP
    _STEP = step


def _armed(action: str, point: str, step: int | None) -> bool:
    if not _FAULTS:
        return False
    step = _STEP if step is None else step
    rank = int(os.environ.get("RANK", _RANK))
    return any((s is None or s == step) and (r is None or r == rank) for s, r in _FAULTS.get((action, point), ()))


def point(name: str, step: int | None = None) -> None:
    """A named point where a process may be killed, signalled, or find the disk full."""
    if _armed("kill", name, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed("term", name, step):
        os.kill(os.getpid(), signal.SIGTERM)
    while _armed("hang", name, step):
        time.sleep(3600)
    if _armed("enospc", name, step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"fault injected at {name}")


def _poison_grad(name: str, x):
    """``x`` whose incoming gradient becomes NaN if a ``nan`` fault is armed for ``name``."""
    if _armed("nan", name, None) and isinstance(x, torch.Tensor) and x.requires_grad:
        x.register_hook(lambda g: g * float("nan"))
    return x


def _poison(name: str, value):
    """``value`` times NaN if a ``nan`` fault is armed for ``name`` at this step."""
    return value * float("nan") if _armed("nan", name, None) else value


def wrap(trainee, loss: str, grad: str | None = None):
    """``trainee`` (a ``step.Trainee``) whose loss named ``loss`` (and the gradient of its forward
    output, ``grad``) becomes NaN at the steps DMD2_FAULT arms; the trainee itself when none is armed."""
    from .step import Wrapped

    class Faulty(Wrapped):
        def __call__(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            return _poison_grad(grad, out) if grad else out

        def backward(self, value):
            return self.inner.backward(_poison(loss, value))

    return Faulty(trainee) if any(a == "nan" and p in {loss, grad} for a, p in _FAULTS) else trainee
