"""Models: the teacher loader, the student loader (``student``), one denoiser interface,
conditioning, the VAE (``vae``), the GAN head and LoRA."""

from .conditioning import Conditioner, cat_cond, cond_to
from .denoiser import Denoiser, mid_block_features
from .gan_head import GANHead
from .loader import Teacher, load_teacher

__all__ = [
    "Conditioner", "Denoiser", "GANHead", "Teacher", "cat_cond", "cond_to",
    "load_teacher", "mid_block_features",
]
