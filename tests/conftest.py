"""Shared test setup: offline, single-threaded, CPU DeepSpeed; tiny random teachers built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Set before any heavy import (torch, deepspeed, diffusers, transformers, wandb).
for _key, _value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "DS_ACCELERATOR": "cpu",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _conditioning_cache(tmp_path_factory):
    """Training runs build their conditioning caches in a session folder, not in ~/.cache."""
    if "DMD2_CACHE_DIR" not in os.environ:
        os.environ["DMD2_CACHE_DIR"] = str(tmp_path_factory.mktemp("cond-cache"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Factory: ``tiny_teacher("sd15")`` -> Path of a tiny random teacher, built once per family per session."""
    built: dict[tuple[str, int], Path] = {}

    def make(family: str, seed: int = 0) -> Path:
        key = (family, seed)
        if key not in built:
            import torch

            torch.set_num_threads(1)
            from dmd2.tiny import make_tiny_teacher

            out = tmp_path_factory.mktemp(f"teacher-{family}-s{seed}", numbered=True)
            built[key] = make_tiny_teacher(family, out, seed=seed)
        return built[key]

    return make


@pytest.fixture(scope="session")
def extractor_file(tmp_path_factory) -> Path:
    """A tiny TorchScript feature extractor with clean-fid's convention: N x 3 x H x W in [0, 255] -> N x 6."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Parameter(torch.randn(12, 6) / 12**0.5)

        def forward(self, x):
            # a matmul, not nn.Linear: in-process ZeRO-3 tests leave F.linear patched with a Python function
            return torch.nn.functional.adaptive_avg_pool2d(x / 255, 2).flatten(1) @ self.proj

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("extractor") / "tiny_features.pt"
    with pytest.warns(FutureWarning):  # TorchScript is deprecated in torch 2.14 but is clean-fid's format
        torch.jit.save(torch.jit.trace(Tiny().eval(), torch.rand(2, 3, 299, 299) * 255), str(path))
    return path
