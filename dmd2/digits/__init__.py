"""The embedded default: scikit-learn's bundled handwritten digits (1797 real 8x8 images, 10
classes, no download), a class-conditional EDM teacher trained on them, and the classifiers that
measure FID / precision / recall / label accuracy in their feature space.

- ``data``        the digits as class sub-folders (a training split and a held-out split)
- ``teacher``     the deterministic, seeded script that trains the diffusers teacher
- ``classifiers`` the feature extractor (TorchScript, clean-fid convention) and the label classifier
- ``metrics``     Kynkaanniemi precision/recall (k=3), label accuracy
- ``demo``        ``make demo`` / ``make bench-quality``: teacher vs students in one table
- ``t2i``         "digits-t2i": an SDXL-layout text-to-image teacher of the same digits (16 px, a VAE,
                  two CLIP encoders, captions such as "a handwritten digit 7"), its prompts file, the
                  captioned real images, and its quality check
"""

RESOLUTION = 8
NUM_CLASSES = 10
