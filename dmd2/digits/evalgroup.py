"""``python -m dmd2.digits.evalgroup COMMANDS.json``: several ``dmd2`` commands (a JSON list of
argument lists) run in order in one process, through the same typer app and arguments as
``dmd2 ...`` on the command line; the first that fails ends the process with its exit status.

Why: make bench-quality runs 24 ``dmd2 eval`` commands, and each new process spent about 7.6 s
starting up before drawing an image, 82% of it importing diffusers, transformers, peft and
torch._dynamo (py-spy on a 2-image eval). One process per run folder's evals (8 in the bench)
starts up once (``demo.train_and_eval``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m dmd2.digits.evalgroup COMMANDS.json (a JSON list of dmd2 argument lists)")
    commands = json.loads(Path(argv[0]).read_text())
    from ..cli import app

    for args in commands:
        print("$ dmd2 " + " ".join(args), flush=True)
        # standalone_mode=False: typer returns a command's exit status (its _fail raises Exit(2))
        # instead of leaving the process, so the next command can run
        status = app(args, prog_name="dmd2", standalone_mode=False)
        sys.stdout.flush()
        if status:
            sys.exit(status)


if __name__ == "__main__":
    main()
