"""``dmd2 prepare`` (dmd2/cache.py): resumable after kill -9 with byte-identical chunks; the same
files from 1 and 2 ranks; chunks that fail their checksum refused by prepare and by training.
(That ``dmd2 train`` reads a prepared cache without encoding: test_cache.py.)"""

import json
from pathlib import Path

import pytest
from helpers import REPO, cli_error, run_cli

from dmd2.config import load_recipe
from dmd2.errors import UserError


def _chunks(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _only_folder(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


@pytest.fixture
def many_prompts(tmp_path):
    """2100 prompts: three prompt chunks of cache.CHUNK rows, so a build can be killed between chunks."""
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"a photo of thing number {i}\n" for i in range(2100)))
    return path


def test_prepare_resumes_after_kill9_and_keeps_its_finished_chunks(tiny_teacher, many_prompts, tmp_path):
    teacher = tiny_teacher("sdxl")
    args = ("prepare", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", f"data.prompts={many_prompts}")
    # tasks in order: uncond, prompts_00000..00002, images_00000; killed once task 2 is written
    killed = run_cli(*args, fault="kill:cache_after_shard@2", DMD2_CACHE_DIR=tmp_path / "one")
    assert killed.returncode in (-9, 137), killed.stderr[-2000:]
    folder = _only_folder(tmp_path / "one")
    assert not (folder / "meta.json").exists()
    kept = {n: (folder / n).stat().st_mtime_ns for n in ("uncond.safetensors", "prompts_00000.safetensors",
                                                          "prompts_00001.safetensors")}
    assert not (folder / "prompts_00002.safetensors").exists()
    # killed between a chunk and its sidecar: that chunk is redone
    again = run_cli(*args, fault="kill:cache_before_sidecar@3", DMD2_CACHE_DIR=tmp_path / "one")
    assert again.returncode in (-9, 137)
    assert (folder / "prompts_00002.safetensors").exists() and not (folder / "prompts_00002.json").exists()
    done = run_cli(*args, DMD2_CACHE_DIR=tmp_path / "one")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 finished chunks kept" in done.stdout, done.stdout
    assert {n: (folder / n).stat().st_mtime_ns for n in kept} == kept  # nothing re-encoded
    assert json.loads((folder / "meta.json").read_text())["prompts"] == 2100
    assert len(_chunks(folder)) == 5


# ~20 s (a clean build and one through the launcher); make test-all. The default suite keeps the
# resumed build above and test_train.py's two-rank launcher run.
@pytest.mark.slow
def test_a_two_rank_prepare_writes_the_one_rank_files(tiny_teacher, many_prompts, tmp_path):
    teacher = tiny_teacher("sdxl")
    args = ("prepare", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", f"data.prompts={many_prompts}")
    one = run_cli(*args, DMD2_CACHE_DIR=tmp_path / "one")
    two = run_cli(*args, ranks=2, DMD2_CACHE_DIR=tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    folder, other = _only_folder(tmp_path / "one"), _only_folder(tmp_path / "two")
    assert other.name == folder.name  # the same key
    assert _chunks(other) == _chunks(folder) and len(_chunks(folder)) == 5


def _batches(recipe, rank=0, world=1, full_verify=False):
    from dmd2.data import build_batches
    from dmd2.models import load_teacher

    teacher = load_teacher(recipe.model.teacher)
    t = recipe.train
    return build_batches(recipe.data, teacher, resolution=teacher.training_resolution(t.resolution),
                         batch_size=t.batch_size, seed=t.seed, cfg_scale=recipe.loss.cfg_scale, rank=rank,
                         world=world, device="cpu", full_verify=full_verify)


def test_a_chunk_that_fails_its_checksum_is_refused(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("DMD2_CACHE_DIR", str(tmp_path / "cache"))
    teacher = tiny_teacher("sd15")
    recipe = load_recipe(REPO / "recipes/tiny_sd15.yaml", [f"model.teacher={teacher}", "output_dir=unused"])
    _batches(recipe)
    folder = _only_folder(tmp_path / "cache")
    chunk = folder / "images_00000.safetensors"
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside a latent
    chunk.write_bytes(bytes(data))
    msg = cli_error("prepare", REPO / "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", "--quiet")
    assert str(chunk) in msg and "checksum" in msg and "dmd2 prepare" in msg
    with pytest.raises(UserError, match="images_00000.safetensors fails its checksum"):
        _batches(recipe)  # what dmd2 train opens
    chunk.unlink()
    with pytest.raises(UserError, match="images_00000.safetensors is missing"):
        _batches(recipe)


def test_prepare_refuses_what_it_cannot_prepare(tiny_teacher, tmp_path):
    teacher = tiny_teacher("sd15")
    msg = cli_error("prepare", REPO / "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", "data.cache=false")
    assert "data.cache" in msg and "nothing to prepare" in msg
    msg = cli_error("prepare", REPO / "recipes/tiny_sd15.yaml", f"model.teacher={tmp_path / 'absent'}")
    assert "model.teacher" in msg and "does not exist" in msg


def test_coco2014_script_builds_prompts_and_a_reference_folder(tmp_path):
    """scripts/coco2014.py (docs/data.md) on a COCO-format annotations file: seeded picks, one
    caption per image, centre-cropped references that data.real_images and data.prompts read."""
    import importlib.util

    from PIL import Image

    from dmd2.data import load_prompts, open_real_images

    spec = importlib.util.spec_from_file_location("coco2014", REPO / "scripts/coco2014.py")
    coco = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(coco)
    (tmp_path / "val2014").mkdir()
    images, annotations = [], []
    for i in range(6):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (40 + 8 * i, 30), (40 * i, 0, 0)).save(tmp_path / "val2014" / name)
        images.append({"id": i, "file_name": name})
        annotations += [{"image_id": i, "caption": f"picture {i}  caption {c}"} for c in range(3)]
    ann = tmp_path / "captions_val2014.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    a = coco.build(ann, tmp_path / "val2014", tmp_path / "a", num=4, res=16)
    b = coco.build(ann, tmp_path / "val2014", tmp_path / "b", num=4, res=16)
    assert (a / "captions.jsonl").read_text() == (b / "captions.jsonl").read_text()
    prompts = load_prompts(a / "captions.txt")
    assert len(prompts) == 4 and all(p.startswith("picture ") and "  " not in p for p in prompts)
    real = open_real_images(str(a), 16, labelled=False)
    assert [it.caption for it in real.items] == prompts and tuple(real.read(0).shape) == (3, 16, 16)
    with pytest.raises(SystemExit, match="exists"):
        coco.build(ann, tmp_path / "val2014", a, num=4, res=16)
