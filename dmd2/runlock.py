"""One writer per run folder: ``dmd2 train`` holds an exclusive lock on ``output_dir`` for the whole run.

Two trainings writing the same folder would interleave metrics rows, rewrite each other's
recipe.yaml and delete each other's checkpoints (start-up cleanup and rotation), so the second
one is refused before it writes anything.

The lock is ``flock`` on ``<output_dir>/.lock``, whose text says who holds it (pid, host, start
time). The kernel drops a flock when its process dies, kill -9 included, so a lock file left by a
dead process is simply taken over (with a warning); there is no stale-lock guessing from pids.
Only rank 0 locks: the other ranks of the same run write their shards into the same folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import UserError

LOCK = ".lock"


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "unknown process"


class RunLock:
    """``with RunLock(output_dir): ...``: held until the block exits, however it exits.

    ``enabled=False`` (ranks other than 0) makes it do nothing. A folder that this lock created
    and that holds nothing else when it is released is removed again, so a run refused for bad
    input leaves no trace.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, *, holder: str = "dmd2 train",
                 field: str = "output_dir", instead: str = ", or choose another output_dir"):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.holder, self.field, self.instead = holder, field, instead  # what the messages name
        self.path = self.run_dir / LOCK
        self.fd: int | None = None
        self.created: list[Path] = []

    def __enter__(self) -> RunLock:
        if self.enabled:
            try:
                self.acquire()
            except BaseException:
                self.release()  # __exit__ is not called when __enter__ raises
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _make_folder(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"{self.field}: {self.run_dir} is a file, not a folder; choose a folder for the run")
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.field}: cannot create {self.run_dir} ({e.strerror})") from None
        self.created = missing  # deepest first

    def acquire(self) -> None:
        self._make_folder()
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"{self.field}: cannot write {self.path} ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                raise UserError(f"{self.field}: {self.run_dir} is in use by another {self.holder} ({_holder(text)}); "
                                f"wait for it to finish or stop it{self.instead}") from None
            except OSError as e:  # a filesystem without locks (some network mounts): run, but say so
                os.close(fd)
                print(f"warning: {self.run_dir}: cannot lock the run folder ({e.strerror}); nothing stops a "
                      f"second {self.holder} from writing to it", flush=True)
                if self.path.stat().st_size == 0:  # the empty file we just made
                    self.path.unlink()
                return
            # The holder before us may have unlinked the file between our open and our flock
            # (release removes it): then we hold a lock on a file nobody else will see. Retry.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if previous:
            # flock was free, so whoever wrote this is gone (killed, or its machine died)
            print(f"warning: {self.run_dir}: taking over the lock left by a process that is gone "
                  f"({_holder(previous)})", flush=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            # Unlink while still holding the lock: a process waiting on this file then sees a
            # different inode (or none) and retries on a fresh file instead of sharing a dead one.
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        for folder in self.created:  # only folders we made, and only if nothing was written in them
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []
