"""``dmd2 serve``: a web page (Gradio) over one loaded generator, for trying prompts interactively.

The generator is loaded once by the project's loader (``models.student.load_student``) and every
request draws through ``generate.draw``, the function ``dmd2 sample`` uses, with the same seeds
(image i from seed + i) and batch size, so a page's images are ``dmd2 sample``'s images. The page
only adds timing and, where ``--tiny-vae`` is given, a choice of decoder.

Bad input in the page (an empty prompt, a label out of range, too many images, bad timesteps)
is answered with a message on the page; the server keeps serving.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shlex
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .generate import choose_timesteps, conditions, draw
from .hub import require
from .logs import to_uint8_images
from .models import vae as vae_io
from .models.student import DTYPES, Student, load_student
from .schedule import T

PRECISIONS = DTYPES
BATCH_SIZE = 8  # dmd2 sample's default --batch-size, so a page's batches are sample's batches
MAX_SEED = 2**63 - 1
TINY_VAE_INSTEAD = "--tiny-vae PATH of a local AutoencoderTiny folder (diffusers save_pretrained)"
CSS = "#images img { image-rendering: pixelated; }"  # tiny models draw 32x32 images: show the pixels


class PageError(Exception):
    """Bad input typed into the page: shown on the page as one line."""


@dataclass
class Drawn:
    """One request's images (N x H x W x 3 uint8) and what it took to draw them (generator: text
    encoders + sampler; decoder: the VAE, if any)."""

    images: torch.Tensor
    seeds: list[int]
    timesteps: list[int]
    generator_s: float
    decoder_s: float
    decoder: str


class _TimedDecode:
    """``gen`` as ``draw`` sees it, except that decoding goes through ``vae`` and is timed.

    With the generator's own VAE this decodes exactly as ``Student.decode`` does."""

    def __init__(self, gen: Student, vae):
        self._gen, self._vae, self.seconds = gen, vae, 0.0

    def __getattr__(self, name):
        return getattr(self._gen, name)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        _sync(x.device)
        start = time.perf_counter()
        out = vae_io.decode(self._vae, x)
        _sync(out.device)
        self.seconds += time.perf_counter() - start
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Demo:
    """A loaded generator and the requests the page makes of it."""

    def __init__(self, gen: Student, *, precision: str = "fp32", tiny_vae=None, max_images: int = 8):
        self.gen, self.precision, self.tiny_vae, self.max_images = gen, precision, tiny_vae, max_images

    @property
    def text(self) -> bool:
        return self.gen.cond.text

    def timesteps_for(self, steps: int) -> list[int]:
        """What ``dmd2 sample --steps`` uses: the trained timesteps or an evenly spaced subset."""
        return choose_timesteps(self.gen.timesteps, int(steps))

    def parse_timesteps(self, text: str) -> list[int]:
        try:
            ts = [int(t) for t in str(text).replace(",", " ").split()]
            return choose_timesteps(self.gen.timesteps, timesteps=ts)
        except (ValueError, UserError):
            raise PageError(f"Timesteps {text!r}: expected strictly descending whole numbers in [0, {T}), "
                            f"e.g. {', '.join(map(str, self.gen.timesteps))}") from None

    def condition(self, value) -> str | int:
        """The prompt (text models) or class label (class-conditional) typed into the page."""
        if self.text:
            prompt = (value or "").strip()
            if not prompt:
                raise PageError(f"Type a prompt: this is a text-to-image ({self.gen.family}) model.")
            return prompt
        n = self.gen.num_classes
        label = _whole(value, "Class label")
        if not 0 <= label < n:
            raise PageError(f"Class label {label} is out of range: the model has {n} classes (0..{n - 1}).")
        return label

    def generate(self, condition, seed, num_images, timesteps: str, *, random_seed: bool = False,
                 tiny_vae: bool = False) -> Drawn:
        """Draw ``num_images`` images of one condition as ``dmd2 sample`` would; raises PageError."""
        cond = self.condition(condition)
        n = _whole(num_images, "Number of images")
        if not 1 <= n <= self.max_images:
            raise PageError(f"Number of images must be 1..{self.max_images} (got {n}); "
                            "serve --max-images raises the limit.")
        first = secrets.randbelow(2**31) if random_seed else _whole(seed, "Seed")
        if not 0 <= first <= MAX_SEED - n:
            raise PageError(f"Seed {first}: must be a whole number in 0..{MAX_SEED - n}.")
        ts = self.parse_timesteps(timesteps)
        if tiny_vae and self.tiny_vae is None:
            raise PageError("No tiny VAE: start dmd2 serve with --tiny-vae PATH to decode with one.")
        conds = conditions(self.gen, [cond] if self.text else (), [] if self.text else [cond], n)
        seeds = [first + i for i in range(n)]
        timed = _TimedDecode(self.gen, self.tiny_vae if tiny_vae else self.gen.vae)
        _sync(self.gen.device)
        start = time.perf_counter()
        images = torch.cat([to_uint8_images(x) for _, x in draw(timed, conds, seeds, ts, range(n), BATCH_SIZE)])
        total = time.perf_counter() - start
        decoder = "tiny VAE" if tiny_vae else ("VAE" if self.gen.vae is not None else "none: pixel space")
        return Drawn(images, seeds, ts, total - timed.seconds, timed.seconds, decoder)

    def sample_command(self, drawn: Drawn, condition) -> str:
        """The ``dmd2 sample`` command that writes the same images (fp32, the model's own VAE)."""
        flag = "--prompt" if self.text else "--label"
        return shlex.join(["dmd2", "sample", self.gen.source, flag, str(condition), "--seed", str(drawn.seeds[0]),
                           "--num-images", str(len(drawn.seeds)), "--timesteps", ",".join(map(str, drawn.timesteps)),
                           "--out", "samples/"])


def _whole(value, what: str) -> int:
    """A whole number from a page field (Gradio sends ints or floats, or None for an empty field)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise PageError(f"{what}: enter a whole number.") from None
    if not f.is_integer():
        raise PageError(f"{what}: {value} is not a whole number.")
    return int(f)


# ---------------------------------------------------------------------------------------------
# Loading


def load_demo(source: str | Path, *, precision: str = "fp32", tiny_vae: str | None = None, max_images: int = 8,
              device=None) -> Demo:
    """Load the generator once (run folder or export) through the project's loader; see ``make_demo``."""
    from .engines import device as default_device

    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if tiny_vae:  # a hub id neither cached nor reachable: say so now, not after loading the generator
        require(tiny_vae, "config.json", what="--tiny-vae", instead=TINY_VAE_INSTEAD)
    gen = load_student(source, device or default_device())
    return make_demo(gen, precision=precision, tiny_vae=tiny_vae, max_images=max_images)


def make_demo(gen: Student, *, precision: str = "fp32", tiny_vae: str | None = None, max_images: int = 8) -> Demo:
    """Cast ``gen`` (in place) to ``precision``, load the tiny VAE, warm up."""
    dtype = PRECISIONS[precision]
    if dtype != torch.float32:  # the loader gives float32
        gen.denoiser.unet.to(dtype)  # Denoiser casts its inputs to the UNet's dtype and returns float32
        if gen.vae is not None and not getattr(gen.vae.config, "force_upcast", False):  # SDXL's VAE overflows in fp16
            gen.vae.to(dtype)
    tiny = _load_tiny_vae(tiny_vae, gen, dtype) if tiny_vae else None
    demo = Demo(gen, precision=precision, tiny_vae=tiny, max_images=max_images)
    # the first call pays one-off costs (kernel selection, allocations); keep them out of the page's timings
    for use_tiny in (False, True) if tiny is not None else (False,):
        demo.generate("warm-up" if demo.text else 0, 0, 1, ", ".join(map(str, gen.timesteps)), tiny_vae=use_tiny)
    return demo


def _load_tiny_vae(path: str, gen: Student, dtype: torch.dtype):
    from diffusers import AutoencoderTiny

    if gen.vae is None:
        raise UserError(f"--tiny-vae: {gen.source} draws pixels, not latents; there is nothing to decode")
    require(path, "config.json", what="--tiny-vae", instead=TINY_VAE_INSTEAD)
    try:
        vae = AutoencoderTiny.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--tiny-vae {path}: not an AutoencoderTiny folder or hub id ({str(e).splitlines()[0]})") \
            from None
    if vae.config.latent_channels != gen.latent_shape[0]:
        raise UserError(f"--tiny-vae {path}: {vae.config.latent_channels} latent channels, the generator draws "
                        f"{gen.latent_shape[0]}")
    return vae.to(gen.device, dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# The page


def build_page(demo: Demo):
    """The Gradio page: controls, a Generate button, a status line and the images."""
    import gradio as gr

    gen = demo.gen
    trained = ", ".join(map(str, gen.timesteps))
    with gr.Blocks(title=f"dmd2 · {Path(gen.source).name}", analytics_enabled=False) as page:
        gr.Markdown(f"## dmd2 · `{gen.source}`\n"
                    f"{gen.family} · step {gen.step} · {gen.resolution}×{gen.resolution} · trained timesteps "
                    f"{trained} · {demo.precision} on {gen.device}")
        with gr.Row():
            if demo.text:
                condition = gr.Textbox(label="Prompt", placeholder="a cat riding a horse", elem_id="prompt", scale=4)
            else:
                condition = gr.Number(label=f"Class label (0..{gen.num_classes - 1})", value=0, precision=0,
                                      elem_id="label", scale=4)
            button = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
        with gr.Row():
            seed = gr.Number(label="Seed (image i uses seed + i)", value=0, precision=0, elem_id="seed")
            random_seed = gr.Checkbox(label="Random seed", value=False, elem_id="random-seed")
            num_images = gr.Number(label=f"Number of images (1..{demo.max_images})", value=min(4, demo.max_images),
                                   precision=0, elem_id="num-images")
        with gr.Row():
            n = len(gen.timesteps)
            steps = gr.Radio(list(range(1, n + 1)), value=n, label=f"Steps (trained: {n})", elem_id="steps")
            timesteps = gr.Textbox(value=trained, label="Timesteps it will use (editable)", elem_id="timesteps")
            tiny = gr.Checkbox(label="Decode with the tiny VAE (AutoencoderTiny)", value=False, elem_id="tiny-vae",
                               visible=demo.tiny_vae is not None)
        status = gr.Markdown("Type a prompt and press Generate." if demo.text else "Pick a class and press Generate.",
                             elem_id="status")
        images = gr.Gallery(label="Images", format="png", columns=4, object_fit="contain", height="auto",
                            elem_id="images")

        def on_steps(k):
            return ", ".join(map(str, demo.timesteps_for(k)))

        def on_generate(cond, seed_v, random_v, n_v, ts_v, tiny_v):
            try:
                drawn = demo.generate(cond, seed_v, n_v, ts_v, random_seed=random_v, tiny_vae=tiny_v)
            except PageError as e:
                return gr.update(), f"**Error:** {e}", []
            except Exception as e:  # the page must keep working whatever one request hits (e.g. out of memory)
                traceback.print_exc(file=sys.stderr)
                return gr.update(), f"**Error:** generation failed: {type(e).__name__}: {str(e).splitlines()[0]}", []
            seeds = drawn.seeds
            seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
            text = (f"{len(seeds)} image(s) · {seed_text} · timesteps {', '.join(map(str, drawn.timesteps))} · "
                    f"generator {drawn.generator_s:.3f} s · decoder ({drawn.decoder}) {drawn.decoder_s:.3f} s")
            if not tiny_v and demo.precision == "fp32":
                text += f"  \nSame images: `{demo.sample_command(drawn, demo.condition(cond))}`"
            return seeds[0], text, list(drawn.images.numpy())

        steps.change(on_steps, steps, timesteps)
        inputs = [condition, seed, random_seed, num_images, timesteps, tiny]
        for trigger in (button.click, condition.submit):
            trigger(on_generate, inputs, [seed, status, images])
    return page


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_free(host: str, port: int) -> None:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(source: str | Path, *, host: str = "127.0.0.1", port: int | None = None, precision: str = "fp32",
          tiny_vae: str | None = None, max_images: int = 8) -> None:
    """Load the generator, serve the page on host:port (default: the first free port from 7860) until Ctrl-C."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if port is not None:
        _check_free(host, port)  # before the minutes a large model may take to load
    demo = load_demo(source, precision=precision, tiny_vae=tiny_vae, max_images=max_images)
    page = build_page(demo)
    # one request at a time: they share one model (and one GPU)
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                    inbrowser=False, ssr_mode=False, mcp_server=False, footer_links=[], css=CSS)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port or '7860..'}: {str(e).split('. ')[0]}") from None
    print(f"dmd2 serve: {demo.gen.source} at {page.local_url} (Ctrl-C to stop)", flush=True)
    if not is_loopback(host):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the page", file=sys.stderr)
    page.block_thread()
