"""File helpers shared by checkpoints, eval caches and exports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def size_and_time(path: Path) -> list:
    """[size, mtime_ns] of a file, [-1, -1] when it cannot be read: what the caches key files by."""
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def atomic_write(path: Path, text: str) -> None:
    """Write to a temp file, fsync, rename over ``path``, fsync the folder: all or nothing. The temp
    file is this process's own (``writer_tag``): two processes writing the same file at once (two
    trainings building one conditioning cache's sidecars) would otherwise rename each other's away."""
    tmp = path.with_name(f".{path.name}.{writer_tag()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def cache_root(name: str) -> Path:
    """dmd2's folder ``name`` under the user's cache ($XDG_CACHE_HOME, default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dmd2" / name


def writer_tag() -> str:
    """host and pid: temp names of processes on different nodes sharing a folder never collide."""
    import socket

    return f"{socket.gethostname()}.{os.getpid()}"


def publish_folder(out: Path, stamp: str, key: dict, build: Callable[[Path], None]) -> Path:
    """``out`` with ``build(folder)``'s files and ``out/stamp`` holding ``key``; kept as it is when
    its stamp already holds ``key``. Built in a folder of this process's own (``writer_tag``) and
    renamed into place, so two processes preparing the same cache at once (two experiments started
    together) never write into, or delete, each other's half-written folder: the first to finish
    wins and the other's identical copy is dropped. A folder without the stamp (half-written by a
    killed process, or another key) is replaced."""
    out = Path(out)

    def current() -> bool:
        f = out / stamp
        return f.is_file() and json.loads(f.read_text()) == key

    if current():
        return out
    tmp = out.with_name(f"{out.name}.tmp.{writer_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # as convert_edm's output: whole or not at all, and a failed build leaves no temp folder
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / stamp).write_text(json.dumps(key))
        if not current():
            shutil.rmtree(out, ignore_errors=True)
            try:
                os.rename(tmp, out)
            except OSError:  # another process's complete copy landed between the two lines above
                if not current():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def sidecar(shard: Path) -> Path:
    """The ``.json`` beside a safetensors shard that records its checksum."""
    return shard.with_suffix(".json")


def save_shard(tensors: dict, path: Path, record: dict | None = None, *, fault: tuple[str, int] | None = None) -> dict:
    """Write a safetensors shard, then its sidecar: ``record`` plus the shard's sha256, size and
    modification time. The shard appears atomically and the sidecar after it, so a shard is
    finished exactly when its sidecar exists and matches (a kill -9 in between redoes it).
    ``fault``: the (point, step) of dmd2/faults.py between the two, for the kill -9 tests."""
    import json

    from safetensors.torch import save_file

    from . import faults

    tmp = path.with_name(f".{path.name}.{writer_tag()}.tmp")
    # no metadata: safetensors writes metadata keys in hash order, and a rebuilt shard must be byte-identical
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    if fault is not None:
        faults.point(*fault)
    st = path.stat()
    record = {**(record or {}), "sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    atomic_write(sidecar(path), json.dumps(record))
    return record


def shard_state(path: Path, *, trust_stat: bool = False) -> str:
    """``"done"``, ``"missing"`` (no shard or no sidecar yet: to be written) or ``"corrupt"`` (the
    shard does not match its sidecar's sha256). With ``trust_stat``, a shard whose size and
    modification time are the ones recorded is not re-hashed (any write to it changes them)."""
    import json

    side = sidecar(path)
    try:
        record = json.loads(side.read_text())
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "corrupt"
    if not isinstance(record, dict) or "sha256" not in record:
        return "corrupt"
    if trust_stat and [st.st_size, st.st_mtime_ns] == [record.get("size"), record.get("mtime_ns")]:
        return "done"
    return "done" if st.st_size == record.get("size", st.st_size) and sha256_file(path) == record["sha256"] else "corrupt"
