"""``data.real_images`` and ``data.prompts`` beyond a folder: webdataset tar shards (as img2dataset
writes them), parquet files, and Hugging Face ``datasets`` ``save_to_disk`` folders.

Every source reads by index without loading the dataset: a tar's member headers are scanned once
(each image's offset and size), a parquet file's row-group sizes come from its metadata and one row
group's image column is read when asked for (a small LRU), a ``datasets`` folder's Arrow files are
memory-mapped. Natural order: shards / files in the order given (a brace pattern's expansion, a
folder's sorted file names, ``state.json``'s ``_data_files``), then members / rows in file order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .data import CAPTION_FILES, IMAGE_EXTS, ImageSource, RealItem, _build_hint, _load_image, _text_of
from .errors import UserError
from .files import size_and_time

_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTS)
_ROW_GROUPS_CACHED = 4  # parquet row groups kept decoded (the cache builder reads in order: one suffices)


def _pyarrow(field: str):
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f'{field}: reading parquet or datasets folders needs pyarrow: pip install "dmd2[data]"') from None
    return pa


def _expand(spec: str, field: str) -> list[str]:
    """A brace pattern's paths in order ("a/{000..002}.tar" -> 3), or [spec]."""
    if "{" not in spec:
        return [spec]
    from braceexpand import UnbalancedBracesError, braceexpand

    try:
        return list(braceexpand(spec))
    except UnbalancedBracesError as e:
        raise UserError(f"{field}: {spec!r}: {e}") from None


def _datasets_files(folder: Path, field: str) -> list[Path]:
    """The Arrow files of a ``datasets`` save_to_disk folder, in ``state.json``'s order."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = []
        raise UserError(f"{field}: {str(folder)!r} is a DatasetDict (splits {', '.join(map(str, splits))}); "
                        f"name one split's folder, e.g. {str(folder / (splits[0] if splits else 'train'))!r}")
    state = folder / "state.json"
    if state.is_file():
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{field}: {str(state)!r}: expected a datasets state.json with _data_files") from None
    else:
        names = sorted(f.name for f in folder.glob("*.arrow"))
    files = [folder / n for n in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{field}: {str(missing[0])!r}, listed in {str(state)!r}, does not exist")
    return files


def source_kind(spec: str, field: str = "data.real_images") -> tuple[str, list[Path]]:
    """("folder" | "webdataset" | "parquet" | "datasets", the data files) for a path or brace pattern;
    "folder" (with no files) also for a path that does not exist, for the folder source's message."""
    paths = _expand(spec, field)
    if len(paths) > 1 or paths[0] != spec:
        files = [Path(p).expanduser() for p in paths]
        found = [f for f in files if f.is_file()]
        if not found:
            raise UserError(f"{field}: {spec!r} matches no files (e.g. {str(files[0])!r} does not exist)"
                            f"{_build_hint(files[0])}")
        if len(found) < len(files):
            missing = [f for f in files if not f.is_file()]
            raise UserError(f"{field}: {spec!r}: {len(missing)} of its {len(files)} files do not exist "
                            f"(e.g. {str(missing[0])!r})")
        suffixes = {f.suffix.lower() for f in files}
        if suffixes == {".tar"}:
            return "webdataset", files
        if suffixes == {".parquet"}:
            return "parquet", files
        raise UserError(f"{field}: {spec!r}: a pattern names .tar shards or .parquet files, not "
                        f"{', '.join(sorted(suffixes))}")
    p = Path(spec).expanduser()
    if p.is_dir():
        if any((p / n).is_file() for n in CAPTION_FILES):
            return "folder", []
        if (p / "state.json").is_file() or (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return "datasets", _datasets_files(p, field)
        for suffix, kind in ((".parquet", "parquet"), (".tar", "webdataset")):
            files = sorted((f for f in p.glob(f"*{suffix}") if f.is_file()), key=lambda f: f.name)
            if files:
                return kind, files
        return "folder", []
    if p.suffix.lower() in (".tar", ".parquet"):
        if not p.is_file():
            raise UserError(f"{field}: {spec!r} does not exist{_build_hint(p)}")
        return ("webdataset" if p.suffix.lower() == ".tar" else "parquet"), [p]
    if p.is_file():
        raise UserError(f"{field}: {spec!r} is a file; expected a folder (captions.jsonl, class sub-folders, "
                        ".tar or .parquet files, a datasets save_to_disk), a .tar, a brace pattern of .tar "
                        "shards, or a .parquet file")
    return "folder", []


def _files_fingerprint(files: list[Path]) -> list:
    return [[str(f.resolve()), *size_and_time(f)] for f in files]


class _Items(Sequence):
    """``items`` of a large source, made on access from compact columns (a caption list and a function
    of the index for the name), so 500k items do not cost 500k RealItem and Path objects."""

    def __init__(self, captions: list[str], name):
        self.captions, self.name = captions, name

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return RealItem(self.name(k), caption=self.captions[k])


# ---------------------------------------------------------------------------------------------
# webdataset tar shards


class TarImages(ImageSource):
    """Webdataset tar shards: each sample is the members sharing a key (the path before the first
    dot of the file name): an image (.jpg/.jpeg/.png/.webp/.bmp) and a caption (.txt, or a .json's
    "prompt"/"caption"/"text"). Samples without an image are counted in ``non_images``."""

    def __init__(self, spec: str | Path, shards: list[Path], resolution: int, *, max_bad_fraction: float = 0.1,
                 field: str = "data.real_images"):
        super().__init__(resolution, max_bad_fraction, field)
        self.root, self.shards = Path(spec), list(shards)
        captions: list[str] = []
        self._names: list[str] = []  # the image member of each item
        where: list[tuple[int, int, int]] = []
        for si, shard in enumerate(self.shards):
            for name, caption, offset, size in self._scan(shard):
                self._names.append(name)
                captions.append(caption)
                where.append((si, offset, size))
        if not captions:
            raise UserError(f"{field}: {str(spec)!r} holds no images (no tar member with an image extension)")
        self._where = np.asarray(where, dtype=np.int64)
        self.items = _Items(captions, lambda k: self.shards[self._where[k, 0]] / self._names[k])

    def _scan(self, shard: Path) -> list[tuple[str, str, int, int]]:
        """(image member, caption, data offset, size) of each sample, from the shard's index when one
        was saved for this file's size and time; tarfile walks every header and reads every caption
        member (5 s per 100k samples), at every start of every rank, so the result is kept in
        ``$DMD2_CACHE_DIR/tar-index`` (a cache that cannot be written only costs the rescan)."""
        from .cache import default_root

        st = shard.stat()
        key = [str(shard.resolve()), st.st_size, st.st_mtime_ns]
        index = default_root() / "tar-index" / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]}.json"
        try:
            saved = json.loads(index.read_text())
            if saved["key"] == key:
                self.non_images += [shard / n for n in saved["non_images"]]
                return [tuple(x) for x in saved["samples"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        before = len(self.non_images)
        samples = self._scan_tar(shard)
        try:
            index.parent.mkdir(parents=True, exist_ok=True)
            tmp = index.with_name(f"{index.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "samples": samples, "non_images": [
                str(p.relative_to(shard)) for p in self.non_images[before:]]}))
            os.replace(tmp, index)
        except OSError:
            pass
        return samples

    def _scan_tar(self, shard: Path) -> list[tuple[str, str, int, int]]:
        try:
            with tarfile.open(shard, "r:") as tf:  # uncompressed: images are read in place by offset
                samples: dict[str, dict[str, tarfile.TarInfo]] = {}
                for m in tf:
                    if not m.isfile():
                        continue
                    folder, _, base = m.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot:
                        self.non_images.append(shard / m.name)
                        continue
                    samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = m
                out = []
                for key, parts in samples.items():
                    image = next((parts[e] for e in _IMAGE_EXTS if e in parts), None)
                    if image is None:
                        self.non_images.append(shard / key)
                        continue
                    out.append((image.name, self._caption(tf, parts), image.offset_data, image.size))
                return out
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"{self.field}: cannot read the tar {str(shard)!r}: {e}") from None

    @staticmethod
    def _caption(tf: tarfile.TarFile, parts: dict[str, tarfile.TarInfo]) -> str:
        if "txt" in parts:
            return tf.extractfile(parts["txt"]).read().decode("utf-8", "replace").strip()
        if "json" in parts:
            try:
                rec = json.loads(tf.extractfile(parts["json"]).read())
            except ValueError:
                return ""
            return (_text_of(rec) or "") if isinstance(rec, dict) else ""
        return ""

    def read(self, k: int) -> torch.Tensor:
        si, offset, size = (int(v) for v in self._where[k])
        with open(self.shards[si], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.items[k].path}: truncated ({len(data)} of {size} bytes)")
        return _load_image(io.BytesIO(data), self.resolution)

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for (si, _, _), name, caption in zip(self._where.tolist(), self._names, self.items.captions, strict=True):
            h.update(json.dumps([si, name, caption]).encode())
        return {"webdataset": _files_fingerprint(self.shards), "items": len(self.items), "sha256": h.hexdigest()}


# ---------------------------------------------------------------------------------------------
# parquet files and datasets folders


class _ParquetPart:
    """One parquet file: row-group sizes from its metadata; columns read when asked for."""

    def __init__(self, path: Path, field: str):
        pa = _pyarrow(field)
        self.path = path
        try:
            meta = pa.parquet.ParquetFile(path)
            self.schema = meta.schema_arrow
            groups = [meta.metadata.row_group(g).num_rows for g in range(meta.metadata.num_row_groups)]
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{field}: cannot read the parquet file {str(path)!r}: {e}") from None
        self.group_starts = np.cumsum([0, *groups])
        self.num_rows = int(self.group_starts[-1])

    def column(self, name: str):
        import pyarrow.parquet as pq

        # without pre-buffering: a caption column over thousands of row groups costs a fraction of the memory
        return pq.ParquetFile(self.path, pre_buffer=False).read(columns=[name], use_threads=False).column(name)

    def group_of(self, row: int) -> tuple[int, int]:
        g = int(np.searchsorted(self.group_starts, row, side="right")) - 1
        return g, row - int(self.group_starts[g])

    def read_group(self, g: int, name: str):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path).read_row_group(g, columns=[name]).column(name)


class _ArrowPart:
    """One Arrow IPC file of a ``datasets`` folder, memory-mapped (nothing is read until used)."""

    def __init__(self, path: Path, field: str):
        pa = _pyarrow(field)
        self.path = path
        try:
            source = pa.memory_map(str(path))
            try:
                self.table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:  # the random-access file format
                self.table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{field}: cannot read the Arrow file {str(path)!r}: {e}") from None
        self.schema, self.num_rows = self.table.schema, self.table.num_rows
        self.group_starts = np.array([0, self.num_rows])

    def column(self, name: str):
        return self.table.column(name)

    def group_of(self, row: int) -> tuple[int, int]:
        return 0, row

    def read_group(self, g: int, name: str):
        return self.table.column(name)


def _open_part(path: Path, field: str):
    return _ArrowPart(path, field) if path.suffix.lower() == ".arrow" else _ParquetPart(path, field)


def _require(part, column: str, setting: str, field: str) -> None:
    if column not in part.schema.names:
        raise UserError(f"{field}: {str(part.path)!r} has no column {column!r} ({setting}); its columns: "
                        f"{', '.join(part.schema.names)}")


def _strings(part, column: str, setting: str, field: str) -> list[str | None]:
    import pyarrow as pa

    _require(part, column, setting, field)
    t = part.schema.field(column).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise UserError(f"{field}: {str(part.path)!r}: column {column!r} ({setting}) holds {t}, not text")
    return part.column(column).to_pylist()


def table_files(path: str | Path, field: str = "data.prompts") -> list[tuple[Path, str]]:
    """(file, "parquet" | "arrow") of a .parquet file, a folder of them or a ``datasets`` folder."""
    kind, files = source_kind(str(path), field)
    if kind not in ("parquet", "datasets"):
        raise UserError(f"{field}: {str(path)!r} is not a .parquet file, a folder of them or a datasets "
                        "save_to_disk folder")
    return [(f, "arrow" if f.suffix.lower() == ".arrow" else "parquet") for f in files]


def table_prompts(path: str | Path, field: str = "data.prompts", caption_column: str = "text") -> list[str]:
    """The non-empty strings of ``caption_column``, in row order."""
    prompts = []
    for f, _ in table_files(path, field):
        part = _open_part(f, field)
        prompts += [s for s in _strings(part, caption_column, "data.caption_column", field) if s and s.strip()]
    if not prompts:
        raise UserError(f"{field}: {str(path)!r} holds no prompts (column {caption_column!r})")
    return prompts


def _image_bytes(value, base: Path) -> bytes:
    """An image cell's bytes: raw binary, or Hugging Face's {bytes, path} (the path read when no bytes)."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            p = Path(value["path"])
            data = (p if p.is_absolute() or p.is_file() else base / p).read_bytes()
    else:
        data = value
    if not data:
        raise ValueError("no image in this row")
    return data


class TableImages(ImageSource):
    """Parquet files or a ``datasets`` folder: images in ``image_column`` (raw bytes or Hugging
    Face's image struct {bytes, path}), captions in ``caption_column``; one row is one item."""

    def __init__(self, spec: str | Path, files: list[Path], resolution: int, *, image_column: str = "image",
                 caption_column: str = "text", max_bad_fraction: float = 0.1, field: str = "data.real_images"):
        pa = _pyarrow(field)
        super().__init__(resolution, max_bad_fraction, field)
        self.root, self.files = Path(spec), list(files)
        self.image_column, self.caption_column = image_column, caption_column
        self.parts = [_open_part(f, field) for f in self.files]
        captions: list[str] = []
        for part in self.parts:
            _require(part, image_column, "data.image_column", field)
            t = part.schema.field(image_column).type
            if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                    or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)):
                raise UserError(f"{field}: {str(part.path)!r}: column {image_column!r} (data.image_column) holds "
                                f"{t}; expected image bytes or Hugging Face's image struct {{bytes, path}}")
            captions += [c or "" for c in _strings(part, caption_column, "data.caption_column", field)]
        if not captions:
            raise UserError(f"{field}: {str(spec)!r} holds no rows")
        self._starts = np.cumsum([0, *(p.num_rows for p in self.parts)])
        self.items = _Items(captions, self._name)
        self._groups: OrderedDict[tuple[int, int], object] = OrderedDict()

    def _locate(self, k: int) -> tuple[int, int]:
        pi = int(np.searchsorted(self._starts, k, side="right")) - 1
        return pi, k - int(self._starts[pi])

    def _name(self, k: int) -> str:
        pi, row = self._locate(k)
        return f"{self.parts[pi].path}:row {row}"

    def _cell(self, k: int):
        pi, row = self._locate(k)
        part = self.parts[pi]
        g, r = part.group_of(row)
        key = (pi, g)
        if key in self._groups:
            self._groups.move_to_end(key)
        else:
            self._groups[key] = part.read_group(g, self.image_column)
            while len(self._groups) > _ROW_GROUPS_CACHED:
                self._groups.popitem(last=False)
        return self._groups[key][r].as_py(), part.path.parent

    def read(self, k: int) -> torch.Tensor:
        value, base = self._cell(k)
        return _load_image(io.BytesIO(_image_bytes(value, base)), self.resolution)

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for caption in self.items.captions:
            h.update(json.dumps(caption).encode())
        return {"table": _files_fingerprint(self.files), "image_column": self.image_column,
                "caption_column": self.caption_column, "items": len(self.items), "sha256": h.hexdigest()}
