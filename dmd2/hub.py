"""Files of Hugging Face hub models, from the local cache first: a model that is neither cached
nor reachable is one line, in seconds.

Left to itself, ``hf_hub_download`` with no network retries for about 20 s per file (and
raises ``LocalEntryNotFoundError``, a subclass of the "no such file" error, so callers mistake
"cannot reach the hub" for "the model has no such file"). Here the cache is read first, the hub
is asked only when ``HF_HUB_OFFLINE`` is not set, once, with a short timeout, and every way of
not getting the file says so. No torch import: the CLI checks ids before it loads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

TEACHER_INSTEAD = "model.teacher=PATH of a local diffusers folder (or download the model first, with network)"


def is_local(source: str) -> bool:
    """A path (absolute, relative with a folder, ~, or existing) rather than a hub id ``org/name``."""
    return source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1] or Path(source).exists()


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _repo_cached(repo_id: str) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def hub_file(repo_id: str, filename: str, *, what: str, instead: str) -> Path | None:
    """``filename`` of hub model ``repo_id`` as a local path; None if the model has no such file.

    ``what`` names the setting in the message (``model.teacher``), ``instead`` says what to pass
    instead (``a local diffusers folder``). Raises UserError (one line) when the model is not in
    the local cache and the hub cannot be reached, or has no model of that id.
    """
    from huggingface_hub import (
        constants,
        get_hf_file_metadata,
        hf_hub_download,
        hf_hub_url,
        try_to_load_from_cache,
    )
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"{what} {repo_id!r}"
    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except HFValidationError as e:
        raise UserError(f"{where}: neither an existing path nor a hub id ({_first_line(e)})") from None
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the hub said earlier that this file does not exist (cached 404)
        return None
    if _offline():
        if _repo_cached(repo_id):
            return None  # the model is cached, without this file
        raise UserError(f"{where}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
                        f"cannot be reached (offline: HF_HUB_OFFLINE is set); pass {instead}")
    # One quick request without retries (hf_hub_download's own retry on network errors takes ~20 s).
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT", 5))
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=timeout)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise UserError(f"{where}: no such model on the hub, or it needs a login (hf auth login) "
                        f"({_first_line(e)}); pass {instead}") from None
    except EntryNotFoundError:
        return None
    except Exception as e:  # DNS, refused, timeout, proxy, 5xx: all mean "cannot be reached"
        raise UserError(f"{where}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
                        f"cannot be reached ({_first_line(e)}); pass {instead}") from None
    try:
        return Path(hf_hub_download(repo_id, filename, etag_timeout=timeout))
    except LocalEntryNotFoundError as e:
        raise UserError(f"{where}: the download failed ({_first_line(e)}); pass {instead}") from None
    except EntryNotFoundError:
        return None


def require(source: str, filename: str, *, what: str, instead: str) -> None:
    """Fail fast (one line) when ``source`` is a hub id that is neither cached nor reachable.

    Local paths pass through: their own loader says what is wrong with them."""
    if source and not is_local(source):
        hub_file(source, filename, what=what, instead=instead)
