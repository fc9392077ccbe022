"""The COCO-2014 files the SD1.5 and SDXL recipes and evaluation protocols read (docs/data.md),
from the official annotations and images, which you download yourself (dmd2 downloads nothing):

    python scripts/coco2014.py --annotations annotations/captions_val2014.json --images val2014 \\
        --out data/coco2014_val30k --num 30000 --res 256          # SD1.5: 30k prompts, 256 px
    python scripts/coco2014.py ... --out data/coco2014_val10k --num 10000 --res 512   # SDXL

writes into --out:
- ``captions.txt``: one caption per picked image (a prompts file for data.prompts, --prompts-file);
- ``captions.jsonl`` and the images, centre-cropped and resized to --res: a data.real_images folder
  and the --ref-dir of ``dmd2 eval --fid`` (reference and prompts pair up, image i with caption i).

Images are picked by a seeded permutation and each gets one of its captions, seeded too, so the same
command gives the same files anywhere. Writes go to ``OUT.tmp`` first: a killed run leaves no
half-made folder under the final name.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def build(annotations: Path, images: Path, out: Path, *, num: int, res: int, seed: int = 0) -> Path:
    from PIL import Image

    try:
        ann = json.loads(annotations.read_text())
        files = {im["id"]: im["file_name"] for im in ann["images"]}
        captions: dict[int, list[str]] = {}
        for a in ann["annotations"]:
            captions.setdefault(a["image_id"], []).append(" ".join(a["caption"].split()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --annotations {annotations}: not a COCO captions file ({e})") from None
    ids = sorted(i for i in files if i in captions)
    if num > len(ids):
        raise SystemExit(f"error: --num {num}: {annotations} has {len(ids)} captioned images")
    if out.exists():
        raise SystemExit(f"error: --out {out} exists; choose a new folder (nothing is mixed into an old one)")
    rng = np.random.default_rng(seed)
    picked = [ids[k] for k in rng.permutation(len(ids))[:num]]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines, texts = [], []
    for n, image_id in enumerate(picked):
        text = captions[image_id][int(rng.integers(len(captions[image_id])))]
        name = f"{n:06d}.png"
        with Image.open(images / files[image_id]) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im.resize((res, res), Image.BICUBIC).save(tmp / name)
        lines.append(json.dumps({"file_name": name, "text": text, "coco_id": image_id}))
        texts.append(text)
    (tmp / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "captions.txt").write_text("\n".join(texts) + "\n")
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotations", type=Path, required=True, help="captions_val2014.json (or captions_train2014.json)")
    ap.add_argument("--images", type=Path, required=True, help="the folder of its images (val2014/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num", type=int, default=30000, help="images (SD1.5 protocol 30000, SDXL 10000)")
    ap.add_argument("--res", type=int, default=256, help="reference side in px (SD1.5 256, SDXL 512)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = build(a.annotations, a.images, a.out, num=a.num, res=a.res, seed=a.seed)
    print(f"{out}: {a.num} images at {a.res} px, captions.txt and captions.jsonl", file=sys.stderr)


if __name__ == "__main__":
    main()
