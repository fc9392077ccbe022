"""The conditioning cache (dmd2/cache.py): training reads the same conditioning it would have encoded,
a second run reads the cache instead of rebuilding it, and a changed data file builds a new one."""

import shutil

import pytest
import torch
from helpers import REPO, loss_curve, run_cli

from dmd2.config import load_recipe
from dmd2.data import build_batches
from dmd2.models import load_teacher

STEPS = 6


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cond-cache"
    monkeypatch.setenv("DMD2_CACHE_DIR", str(path))
    return path


def _setup(teacher, family="sd15", *overrides):
    recipe = load_recipe(REPO / f"recipes/tiny_{family}.yaml", [f"model.teacher={teacher}", "output_dir=unused", *overrides])
    teacher = load_teacher(recipe.model.teacher)
    t = recipe.train
    return build_batches(recipe.data, teacher, resolution=teacher.training_resolution(t.resolution),
                         batch_size=t.batch_size, seed=t.seed, cfg_scale=recipe.loss.cfg_scale, rank=0, world=1,
                         device="cpu")


def _cache(batches):
    """The ConditioningCache behind ``batches``, None when it encodes every step."""
    return getattr(batches.source, "cache", None)


def _batches(setup, steps=STEPS):
    return [setup(s, torch.Generator().manual_seed(s)) for s in range(steps)]


def _assert_same(a, b, exact=True):
    for field in ("cond", "uncond", "real_cond"):
        da, db = getattr(a, field), getattr(b, field)
        assert (da is None) == (db is None)
        for k in da or {}:
            if exact:
                assert torch.equal(da[k], db[k]), (field, k)
            else:  # encoders run on other batch compositions: equal up to float rounding
                torch.testing.assert_close(da[k], db[k], rtol=1e-5, atol=1e-6)
    if exact:
        assert torch.equal(a.real, b.real)
    else:
        torch.testing.assert_close(a.real, b.real, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "classcond"])
def test_cached_batches_equal_encoded_batches(tiny_teacher, cache_dir, family):
    teacher = tiny_teacher(family)
    cached = _setup(teacher, family)
    encoded = _setup(teacher, family, "data.cache=false")
    assert _cache(cached) is not None and _cache(encoded) is None
    for a, b in zip(_batches(cached), _batches(encoded), strict=True):
        _assert_same(a, b, exact=False)
    # previews draw the same prompts
    if family != "classcond":
        torch.testing.assert_close(cached.preview_cond(3)["encoder_hidden_states"],
                                   encoded.preview_cond(3)["encoder_hidden_states"], rtol=1e-5, atol=1e-6)


def test_second_run_reads_the_cache(tiny_teacher, cache_dir):
    teacher = tiny_teacher("sd15")
    first = _setup(teacher)
    files = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.safetensors")}
    assert files and len(list(cache_dir.iterdir())) == 1
    second = _setup(teacher)
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.safetensors")} == files  # nothing rebuilt
    for a, b in zip(_batches(first), _batches(second), strict=True):
        _assert_same(a, b)  # bitwise: both read the same files


def test_cache_is_rebuilt_when_the_data_changes(tiny_teacher, cache_dir, tmp_path):
    teacher = tiny_teacher("sd15")
    prompts = tmp_path / "prompts.txt"
    shutil.copy(REPO / "recipes/data/tiny_prompts.txt", prompts)
    images = tmp_path / "images"
    shutil.copytree(REPO / "recipes/data/tiny_images", images)
    data = [f"data.prompts={prompts}", f"data.real_images={images}"]
    a = _setup(teacher, "sd15", *data)
    prompts.write_text(prompts.read_text() + "a purple triangle\n")
    b = _setup(teacher, "sd15", *data)
    assert _cache(a).folder != _cache(b).folder and _cache(b).num_prompts == _cache(a).num_prompts + 1
    enc = b.conditioner.encode_prompts(["a purple triangle"])["encoder_hidden_states"]
    torch.testing.assert_close(_cache(b).prompts([_cache(b).num_prompts - 1])["encoder_hidden_states"], enc,
                               rtol=1e-5, atol=1e-6)
    first = sorted(images.glob("*.png"))[0]  # an image rewritten (new size/time) is a new cache too
    shutil.copy(sorted(images.glob("*.png"))[1], first)
    c = _setup(teacher, "sd15", *data)
    assert _cache(c).folder not in (_cache(a).folder, _cache(b).folder)
    assert len(list(cache_dir.iterdir())) == 3
    # and the training resolution is part of the key
    d = _setup(teacher, "sd15", *data, "train.resolution=64")
    assert _cache(d).folder not in (_cache(a).folder, _cache(b).folder, _cache(c).folder)


def test_unreadable_images_are_skipped_as_without_cache(tiny_teacher, cache_dir, tmp_path):
    teacher = tiny_teacher("sd15")
    images = tmp_path / "images"
    shutil.copytree(REPO / "recipes/data/tiny_images", images)
    (images / "img_003.png").write_bytes(b"not a png")
    data = [f"data.real_images={images}", "data.max_bad_fraction=0.5"]
    cached, encoded = _setup(teacher, "sd15", *data), _setup(teacher, "sd15", *data, "data.cache=false")
    assert _cache(cached).bad == [3]
    for step in range(8):  # covers every item, the bad one included
        a = cached(step, torch.Generator().manual_seed(step))
        b = encoded(step, torch.Generator().manual_seed(step))
        torch.testing.assert_close(a.real, b.real, rtol=1e-5, atol=1e-6)


def test_prepared_cache_is_what_train_reads(tiny_teacher, tmp_path):
    """Through the CLI: ``dmd2 prepare`` builds the cache under the key training looks for, so the
    run after it encodes nothing (its files untouched, no encoding bar); that run's losses equal a
    run that encodes every step (data.cache=false, slow: the batches themselves are compared in
    test_cached_batches_equal_encoded_batches)."""
    teacher = tiny_teacher("sd15")
    env = {"DMD2_CACHE_DIR": str(tmp_path / "cache")}
    common = ("recipes/tiny_sd15.yaml", f"model.teacher={teacher}")
    res = run_cli("prepare", *common, **env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "12 images" in res.stdout and "16 prompts" in res.stdout
    (folder,) = (tmp_path / "cache").iterdir()
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    run = tmp_path / "cached"
    res = run_cli("train", *common, f"output_dir={run}", "train.max_steps=3", "train.update_ratio=1", **env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "conditioning cache found" in res.stdout and "encoding" not in res.stderr, res.stdout[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert set(loss_curve(run)) == {1, 2, 3}


@pytest.mark.slow  # ~10 s; make test-all
def test_cached_and_encoded_runs_have_the_same_losses(tiny_teacher, tmp_path):
    teacher = tiny_teacher("sd15")
    env = {"DMD2_CACHE_DIR": str(tmp_path / "cache")}
    curves = {}
    for name, extra in (("cached", []), ("encoded", ["data.cache=false"])):
        run = tmp_path / name
        res = run_cli("train", "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", f"output_dir={run}",
                      "train.max_steps=3", "train.update_ratio=1", *extra, **env)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        curves[name] = loss_curve(run)
    for step, losses in curves["cached"].items():
        for k, v in losses.items():
            assert v == pytest.approx(curves["encoded"][step][k], rel=1e-4, abs=1e-7), (step, k)


@pytest.mark.parametrize("cache", ["true", "false"])
def test_generator_prompts_from_the_real_batch_captions(tiny_teacher, cache_dir, cache):
    """data.generator_prompts=captions (the authors' multi-step mode): the generator is conditioned
    on the captions of the step's real images, with or without data.prompts."""
    teacher = tiny_teacher("sdxl")
    for extra in ([], ["data.prompts=null"]):
        batches = _setup(teacher, "sdxl", "data.generator_prompts=captions", f"data.cache={cache}", *extra)
        for b in _batches(batches, 3):
            for k in b.cond:
                assert torch.equal(b.cond[k], b.real_cond[k]), k
        assert batches.preview_cond(2)["encoder_hidden_states"].shape[0] == 2
    plain = _setup(teacher, "sdxl", f"data.cache={cache}")(0, torch.Generator().manual_seed(0))
    assert not torch.equal(plain.cond["encoder_hidden_states"], plain.real_cond["encoder_hidden_states"])


def test_generator_prompts_captions_needs_real_images(tiny_teacher):
    from dmd2.config import RecipeError

    with pytest.raises(RecipeError, match="data.generator_prompts"):
        load_recipe(REPO / "recipes/tiny_sdxl.yaml", ["model.teacher=x", "data.generator_prompts=captions",
                                                       "data.real_images=null", "loss.gan.enabled=false"])


def _write_many(path, text, n):
    from dmd2.files import atomic_write

    for _ in range(n):
        atomic_write(path, text)


def test_two_processes_writing_one_file_at_once_both_succeed(tmp_path):
    """Two trainings started together on the same data build the same conditioning cache chunks and
    write the same sidecars (files.save_shard -> atomic_write). With one fixed temp name the second
    writer's rename found its temp file already renamed away by the first, and that training died
    with FileNotFoundError (seen in make bench-quality's two digits students). Each writer now has
    its own temp file: both finish, the file holds one writer's whole text, and no temp is left."""
    import multiprocessing as mp

    path = tmp_path / "images_00000.json"
    texts = ['{"writer": "a"}' * 50, '{"writer": "b"}' * 50]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(path, t, 400)) for t in texts]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert path.read_text() in texts
    assert sorted(f.name for f in tmp_path.iterdir()) == [path.name]
