"""data.real_images / data.prompts beyond a folder (dmd2/sources.py): the same images and captions as
webdataset tar shards, parquet (Hugging Face's image struct, raw bytes), and a ``datasets``
save_to_disk folder read the same, in the same order, into the same conditioning cache."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import REPO, cli_error

from dmd2.config import load_recipe
from dmd2.data import build_batches, load_prompts, open_real_images, prompts_fingerprint
from dmd2.errors import UserError

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

FOLDER = REPO / "recipes/data/tiny_images"
PROMPTS = REPO / "recipes/data/tiny_prompts.txt"
RES = 16


def _samples() -> list[tuple[str, bytes, str]]:
    rows = [json.loads(line) for line in (FOLDER / "captions.jsonl").read_text().splitlines() if line.strip()]
    return [(r["file_name"], (FOLDER / r["file_name"]).read_bytes(), r["text"]) for r in rows]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tars(folder: Path, samples, bad: int | None = None) -> str:
    """Two shards as img2dataset writes them: the first with .txt captions, the second with .json."""
    folder.mkdir(parents=True)
    half = (len(samples) + 1) // 2
    for s, chunk in enumerate((samples[:half], samples[half:])):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for i, (_, data, text) in enumerate(chunk):
                key = f"{s:05d}{i:04d}"
                k = s * half + i
                _add(tf, f"{key}.png", b"not a png" if k == bad else data)
                if s == 0:
                    _add(tf, f"{key}.txt", text.encode())
                else:
                    _add(tf, f"{key}.json", json.dumps({"caption": text, "url": "http://x", "key": key}).encode())
    return str(folder / "{00000..00001}.tar")


def _struct(samples, bad=None):
    return pa.array([{"bytes": b"garbage" if k == bad else data, "path": name}
                     for k, (name, data, _) in enumerate(samples)],
                    type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def write_parquet(path: Path, samples, bad: int | None = None) -> str:
    """One file, Hugging Face's image struct, row groups of 5 (three groups for 12 images)."""
    pq.write_table(pa.table({"image": _struct(samples, bad), "text": [t for *_, t in samples]}), path,
                   row_group_size=5)
    return str(path)


def write_parquet_folder(folder: Path, samples) -> str:
    """Two files of raw bytes, other column names (data.image_column=png, data.caption_column=caption)."""
    folder.mkdir(parents=True)
    for i, chunk in enumerate((samples[:7], samples[7:])):
        pq.write_table(pa.table({"caption": [t for *_, t in chunk], "png": pa.array([d for _, d, _ in chunk], pa.binary())}),
                       folder / f"train-{i:05d}-of-00002.parquet")
    return str(folder)


def write_datasets(folder: Path, columns: dict) -> str:
    """The layout of datasets' save_to_disk: dataset_info.json, state.json, an Arrow IPC stream."""
    folder.mkdir(parents=True)
    table = pa.table(columns)
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=5):
            writer.write_batch(batch)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}], "_split": None}))
    return str(folder)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{format: (data.real_images, extra overrides)}: the tiny images in every form."""
    root = tmp_path_factory.mktemp("sources")
    samples = _samples()
    return {
        "folder": (str(FOLDER), []),
        "webdataset": (write_tars(root / "shards", samples), []),
        "parquet": (write_parquet(root / "images.parquet", samples), []),
        "parquet_folder": (write_parquet_folder(root / "pq", samples),
                           ["data.image_column=png", "data.caption_column=caption"]),
        "datasets": (write_datasets(root / "ds", {"image": _struct(samples), "text": [t for *_, t in samples]}), []),
    }


def _open(spec, extra=(), **kw):
    cols = dict(o.split("=", 1) for o in extra)
    return open_real_images(spec, RES, labelled=False, image_column=cols.get("data.image_column"),
                            caption_column=cols.get("data.caption_column"), **kw)


def test_every_format_reads_the_same_items(sources):
    ref = _open(*sources["folder"])
    captions = [it.caption for it in ref.items]
    images = [ref.read(k) for k in range(len(ref))]
    assert len(ref) == 12
    for name, (spec, extra) in sources.items():
        src = _open(spec, extra)
        assert [it.caption for it in src.items] == captions, name
        for k in range(len(src)):
            assert torch.equal(src.read(k), images[k]), (name, k)
        batch, items = src.load([11, 0, 5])
        assert torch.equal(batch, torch.stack([images[11], images[0], images[5]])) and items[0] == src.items[11]
        src.probe()
        fp = src.fingerprint()
        assert fp["items"] == 12 and fp == _open(spec, extra).fingerprint(), name
    tars = _open(sources["webdataset"][0])
    assert str(tars.items[0].path).endswith("00000.tar/000000000.png")
    assert str(_open(sources["parquet"][0]).items[7].path).endswith("images.parquet:row 7")


def test_folder_fingerprint_keeps_its_old_content(sources):
    """Existing caches keep their keys: the folder's fingerprint is what cache.py computed before."""
    import hashlib

    real = _open(sources["folder"][0])
    h = hashlib.sha256()
    for it in real.items:
        st = it.path.stat()
        h.update(json.dumps([str(it.path), it.caption, it.label, st.st_size, st.st_mtime_ns]).encode())
    assert real.fingerprint() == {"root": str(FOLDER.resolve()), "items": 12, "sha256": h.hexdigest()}


@pytest.fixture(scope="module")
def sd15(tiny_teacher):
    from dmd2.models import load_teacher

    return load_teacher(str(tiny_teacher("sd15")))


def _batches(teacher, *overrides):
    recipe = load_recipe(REPO / "recipes/tiny_sd15.yaml", ["output_dir=unused", *overrides])
    return build_batches(recipe.data, teacher, resolution=teacher.training_resolution(recipe.train.resolution),
                         batch_size=2, seed=0, cfg_scale=recipe.loss.cfg_scale, rank=0, world=1, device="cpu")


def test_every_format_builds_the_same_cache(sd15, sources, tmp_path, monkeypatch):
    teacher = sd15
    got = {}
    for name, (spec, extra) in sources.items():
        monkeypatch.setenv("DMD2_CACHE_DIR", str(tmp_path / name))  # fingerprints differ: separate roots anyway
        cache = _batches(teacher, f"data.real_images={spec}", *extra).source.cache
        assert cache.images == 12 and not cache.bad
        got[name] = cache.real(list(range(12)))
    ref_latents, ref_cond, _ = got.pop("folder")
    for name, (latents, cond, used) in got.items():
        assert used == list(range(12))
        assert torch.equal(latents, ref_latents), name
        assert cond.keys() == ref_cond.keys() and all(torch.equal(cond[k], ref_cond[k]) for k in cond), name


def test_corrupt_samples_are_skipped_and_counted(sd15, tmp_path, monkeypatch):
    teacher = sd15
    samples = _samples()
    specs = {"webdataset": write_tars(tmp_path / "shards", samples, bad=3),
             "parquet": write_parquet(tmp_path / "bad.parquet", samples, bad=3)}
    for name, spec in specs.items():
        src = _open(spec, max_bad_fraction=0.5)
        with pytest.raises((OSError, ValueError)):
            src.read(3)
        _, items = src.load([3])
        assert src.bad == {3} and items == [src.items[4]], name
        monkeypatch.setenv("DMD2_CACHE_DIR", str(tmp_path / f"cache-{name}"))
        cache = _batches(teacher, f"data.real_images={spec}", "data.max_bad_fraction=0.5").source.cache
        assert cache.bad == [3] and cache.ok.tolist() == [k != 3 for k in range(12)], name
    with pytest.raises(UserError, match=r"^data.real_images: 1 of 12 images are unreadable .*bad.parquet:row 3"):
        _open(specs["parquet"], max_bad_fraction=0.0).load([3])


def test_prompts_from_tables_equal_the_txt(tmp_path):
    prompts = load_prompts(PROMPTS)
    pq.write_table(pa.table({"text": prompts}), tmp_path / "p.parquet")
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": prompts[:3]}), folder / "a.parquet")
    pq.write_table(pa.table({"prompt": [*prompts[3:], None, " "]}), folder / "b.parquet")  # blanks dropped
    ds = write_datasets(tmp_path / "ds", {"text": prompts, "n": list(range(len(prompts)))})
    assert load_prompts(tmp_path / "p.parquet") == prompts
    assert load_prompts(folder, caption_column="prompt") == prompts
    assert load_prompts(ds) == prompts
    # the cache key of a table: its files' sizes and times and the column, not a read of the contents
    fp = prompts_fingerprint(folder, "prompt")
    assert fp == prompts_fingerprint(folder, "prompt") != prompts_fingerprint(folder, "text")
    from dmd2.files import sha256_file

    assert prompts_fingerprint(PROMPTS) == sha256_file(PROMPTS)  # .txt keys as before
    with pytest.raises(UserError, match=r"^data.prompts: .*has no column 'text' \(data.caption_column\); "
                                        r"its columns: prompt$"):
        load_prompts(folder)


def _err(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors_are_one_line(sources, tmp_path):
    missing = str(tmp_path / "none" / "{00000..00003}.tar")
    assert _err(_open, missing).startswith(f"data.real_images: {missing!r} matches no files")
    some = sources["webdataset"][0].replace("00001}", "00002}")
    assert "1 of its 3 files do not exist" in _err(_open, some)
    msg = _err(_open, sources["parquet"][0], ["data.image_column=jpg"])
    assert msg.endswith("has no column 'jpg' (data.image_column); its columns: image, text")
    msg = _err(_open, sources["parquet_folder"][0])
    assert "has no column 'image' (data.image_column); its columns: caption, png" in msg
    # empty sources
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert "holds no images" in _err(_open, str(tmp_path / "empty.tar"))
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "text": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    assert "holds no rows" in _err(_open, str(tmp_path / "empty.parquet"))
    # unreadable files
    (tmp_path / "junk.tar").write_bytes(b"\x1f\x8b not a tar" * 100)
    assert _err(_open, str(tmp_path / "junk.tar")).startswith(f"data.real_images: cannot read the tar {str(tmp_path / 'junk.tar')!r}")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    assert "cannot read the parquet file" in _err(_open, str(tmp_path / "junk.parquet"))
    # class-conditional teachers read class folders only
    msg = _err(open_real_images, sources["webdataset"][0], RES, labelled=True, num_classes=10)
    assert msg.startswith("data.real_images: ") and "class-conditional" in msg
    assert "'text'" in _err(load_prompts, sources["parquet_folder"][0])


def test_without_pyarrow_one_line_names_the_extra(sources, monkeypatch):
    for mod in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    msg = _err(_open, sources["parquet"][0])
    assert msg == 'data.real_images: reading parquet or datasets folders needs pyarrow: pip install "dmd2[data]"'
    assert _err(load_prompts, sources["datasets"][0]).startswith("data.prompts: reading parquet")


def test_brace_patterns_survive_recipe_paths(tmp_path):
    recipe = tmp_path / "r.yaml"
    text = (REPO / "recipes/tiny_sd15.yaml").read_text().replace("real_images: data/tiny_images",
                                                                   "real_images: shards/{00000..00099}.tar")
    recipe.write_text(text.replace("prompts: data/tiny_prompts.txt", "prompts: prompts.parquet"))
    r = load_recipe(recipe)
    assert r.data.real_images == str(tmp_path / "shards/{00000..00099}.tar")
    assert r.data.prompts == str(tmp_path / "prompts.parquet")
    assert (r.data.image_column, r.data.caption_column) == ("image", "text")
    r = load_recipe(recipe, ["data.real_images=/data/laion/{00000..00009}.tar", "data.caption_column=caption"])
    assert r.data.real_images == "/data/laion/{00000..00009}.tar" and r.data.caption_column == "caption"


def test_cli_exit_status_2_for_a_pattern_matching_nothing(tiny_teacher, tmp_path):
    pattern = tmp_path / "nothing/{00000..00009}.tar"
    line = cli_error("train", REPO / "recipes/tiny_sd15.yaml", f"model.teacher={tiny_teacher('sd15')}",
                     f"output_dir={tmp_path / 'run'}", f"data.real_images={pattern}")
    assert line == f"error: data.real_images: {str(pattern)!r} matches no files (e.g. {str(tmp_path / 'nothing/00000.tar')!r} does not exist)" \
        "; docs/data.md says how to make COCO-2014 prompts and a LAION-style image set"


def test_live_encoding_reads_the_same_batches(sd15, sources):
    """data.cache=false: the step's real batch and its captions' conditioning come from read(k) too."""
    def steps(name):
        spec, extra = sources[name]
        b = _batches(sd15, f"data.real_images={spec}", "data.cache=false", "data.generator_prompts=captions", *extra)
        return [b(s, torch.Generator().manual_seed(s)) for s in range(2)]

    ref = steps("folder")
    for name in ("webdataset", "parquet_folder", "datasets"):
        for a, b in zip(ref, steps(name), strict=True):
            torch.testing.assert_close(a.real, b.real, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.cond["encoder_hidden_states"], b.cond["encoder_hidden_states"])


def test_tar_index_is_kept_and_follows_the_shard(tmp_path, monkeypatch):
    """The second open reads each shard's saved index instead of walking the tar; a shard written
    again (another size or time) is scanned again."""
    import dmd2.sources as sources_mod

    monkeypatch.setenv("DMD2_CACHE_DIR", str(tmp_path / "cache"))
    spec = write_tars(tmp_path / "shards", _samples())
    first = _open(spec)
    with monkeypatch.context() as m:
        m.setattr(sources_mod.tarfile, "open", lambda *a, **k: pytest.fail("the tar was walked again"))
        again = _open(spec)
        assert list(again.items) == list(first.items) and torch.equal(again.read(7), first.read(7))
    assert len(list((tmp_path / "cache" / "tar-index").glob("*.json"))) == 2
    samples = _samples()
    samples[0] = (samples[0][0], samples[0][1], "a new caption")
    shutil.rmtree(tmp_path / "shards")
    spec = write_tars(tmp_path / "shards", samples)
    assert _open(spec).items[0].caption == "a new caption"
