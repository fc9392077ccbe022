"""Write constraints.txt: the exact versions of dmd2's dependencies (``.[dev]``, transitively) as
installed in this venv, the set the test suite last passed with.

    .venv/bin/python scripts/constraints.py          # after `make install` and `make test` pass

`make install` installs through it (pip's ``-c``), so a clean checkout, CI included, gets the
versions the suite was run with instead of whatever the package index holds that day; plain
``pip install dmd2`` keeps pyproject's ranges. torch and torchvision are left out (the Makefile's
TORCH pins them, and users pick their CUDA build), and so is what only torch needs (sympy,
triton, the nvidia-* wheels of PyPI's CUDA build...): a torch that the user installed by hand, and
that make install keeps, brings its own.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TORCH = {"torch", "torchvision"}


def closure(root: str = "dmd2[dev]") -> dict[str, str]:
    """Installed name -> version of everything ``root`` requires, transitively (markers evaluated
    with the extras asked for at each step)."""
    found: dict[str, str] = {}
    todo, seen = [Requirement(root)], set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            sys.exit(f"constraints: {req.name} (needed by dmd2[dev]) is not installed: run make install first")
        if name != "dmd2":
            found[name] = dist.version
        if name in TORCH:  # what torch itself needs comes with the build the user picked
            continue
        envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return found


def render() -> str:
    """constraints.txt as this venv would have it (tests/test_install.py compares the two)."""
    pins = {n: v for n, v in closure().items() if n not in TORCH}
    head = ("# Written by scripts/constraints.py from a venv the test suite passed in; make install uses it\n"
            "# (pip -c). Regenerate after changing pyproject's dependencies. torch: the Makefile's TORCH.\n")
    return head + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))


def main() -> None:
    text = render()
    (ROOT / "constraints.txt").write_text(text)
    print(f"constraints.txt: {text.count('==')} pins")


if __name__ == "__main__":
    main()
