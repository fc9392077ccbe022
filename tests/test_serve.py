"""`dmd2 serve`: the page's requests in-process, and the real server driven in headless Chromium.

The browser test starts `dmd2 serve` on a tiny trained run, generates from the page and compares
the PNGs the page shows with the ones `dmd2 sample` wrote for the same prompt, seed and
timesteps: both draw through `generate.draw` with the same seeds and batch size, so they must
agree to within 1 of 255 (measured: identical). It needs Debian's chromium + chromium-driver and
selenium (`.ci/run` installs them) and is skipped with the reason where they are missing.
Set DMD2_SCREENSHOT=PATH to keep a copy of its screenshot (docs/serve.png is one).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_cmd, cli_env, run_cli
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("gradio", reason="dmd2 serve needs gradio: pip install -e '.[serve]'")

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PIXEL_TOL = 1  # of 255: the page and dmd2 sample draw through the same function (measured: 0)
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


def _teacher_generator(teacher: Path, recipe: str):
    """An untrained "generator" (the teacher's UNet) behind the loader's Student: fast page checks."""
    from dmd2.config import load_recipe
    from dmd2.models import load_teacher
    from dmd2.models.student import Student

    cfg = load_recipe(REPO / "recipes" / recipe, [f"model.teacher={teacher}"])
    return Student(load_teacher(str(teacher)), cfg, None, str(teacher), "cpu")


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory, tiny_teacher) -> Path:
    """A 2-step generator (timesteps [999, 499]) trained 2 steps through the CLI."""
    run = tmp_path_factory.mktemp("runs") / "sd15"
    res = run_cli("train", "recipes/tiny_sd15.yaml", f"model.teacher={tiny_teacher('sd15')}", "train.max_steps=2",
                  "train.checkpoint_every=2", "generator.num_steps=2", "optim.generator.lr=1e-3", f"output_dir={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    return run


# ---------------------------------------------------------------------------------------------
# The page's requests, in-process


def test_requests_draw_like_sample_and_bad_input_is_a_message(tiny_teacher):
    from dmd2.generate import generate_images
    from dmd2.serve import PageError, build_page, make_demo

    gen = _teacher_generator(tiny_teacher("classcond"), "tiny_classcond.yaml")
    demo = make_demo(gen, max_images=4)
    drawn = demo.generate(3, 5, 2, "999")
    assert drawn.seeds == [5, 6] and drawn.timesteps == [999] and drawn.images.shape == (2, 16, 16, 3)
    assert drawn.decoder.startswith("none") and drawn.generator_s > 0
    assert torch.equal(drawn.images, generate_images(gen, [3, 3], seed=5, timesteps=[999]))
    assert demo.generate(3, 0, 1, "999", random_seed=True).seeds[0] >= 0
    assert demo.timesteps_for(1) == [999]
    for args, message in [
        ((10, 0, 1, "999"), "Class label 10 is out of range: the model has 10 classes (0..9)"),
        ((-1, 0, 1, "999"), "Class label -1 is out of range"),
        ((None, 0, 1, "999"), "Class label: enter a whole number"),
        ((2.5, 0, 1, "999"), "Class label: 2.5 is not a whole number"),
        ((1, 0, 5, "999"), "Number of images must be 1..4 (got 5)"),
        ((1, 0, 0, "999"), "Number of images must be 1..4 (got 0)"),
        ((1, -3, 1, "999"), "Seed -3: must be a whole number"),
        ((1, None, 1, "999"), "Seed: enter a whole number"),
        ((1, 0, 1, "499, 999"), "Timesteps '499, 999': expected strictly descending"),
        ((1, 0, 1, "soon"), "Timesteps 'soon'"),
        ((1, 0, 1, ""), "Timesteps ''"),
    ]:
        with pytest.raises(PageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("..", r"\.\.")):
            demo.generate(*args)
    with pytest.raises(PageError, match="start dmd2 serve with --tiny-vae"):
        demo.generate(1, 0, 1, "999", tiny_vae=True)
    build_page(demo)  # the class-label page builds (the browser test drives the prompt page)


def test_precision_and_tiny_vae(tiny_teacher, tmp_path):
    from diffusers import AutoencoderTiny

    from dmd2.errors import UserError
    from dmd2.serve import PageError, make_demo

    teacher = tiny_teacher("sd15")
    fp32 = make_demo(_teacher_generator(teacher, "tiny_sd15.yaml")).generate("a red circle", 1, 2, "999")
    bf16 = make_demo(_teacher_generator(teacher, "tiny_sd15.yaml"), precision="bf16")
    assert bf16.gen.denoiser.unet.dtype == torch.bfloat16
    low = bf16.generate("a red circle", 1, 2, "999")
    assert (low.images.float() - fp32.images.float()).abs().mean() < 8  # of 255: same image, coarser arithmetic

    # an AutoencoderTiny that decodes 4 x 8 x 8 latents to 32 x 32 images, as the tiny SD1.5 VAE does
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                    num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1)).save_pretrained(tmp_path / "taesd")
    demo = make_demo(_teacher_generator(teacher, "tiny_sd15.yaml"), tiny_vae=str(tmp_path / "taesd"))
    tiny = demo.generate("a red circle", 1, 2, "999", tiny_vae=True)
    assert tiny.decoder == "tiny VAE" and tiny.images.shape == (2, 32, 32, 3) and tiny.decoder_s > 0
    assert torch.equal(demo.generate("a red circle", 1, 2, "999").images, fp32.images)  # the VAE stays the default
    with pytest.raises(PageError, match="Type a prompt: this is a text-to-image"):
        demo.generate("   ", 1, 1, "999")

    AutoencoderTiny(latent_channels=3, encoder_block_out_channels=(8,), decoder_block_out_channels=(8,),
                    num_encoder_blocks=(1,), num_decoder_blocks=(1,)).save_pretrained(tmp_path / "wrong")
    with pytest.raises(UserError, match="3 latent channels, the generator draws 4"):
        make_demo(_teacher_generator(teacher, "tiny_sd15.yaml"), tiny_vae=str(tmp_path / "wrong"))
    with pytest.raises(UserError, match="draws pixels, not latents"):
        make_demo(_teacher_generator(tiny_teacher("classcond"), "tiny_classcond.yaml"), tiny_vae=str(tmp_path / "taesd"))


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    from dmd2.cli import app
    from dmd2.serve import is_loopback

    def error(*args) -> str:
        res = CliRunner().invoke(app, ["serve", *map(str, args)])
        assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        return lines[0]

    assert "no such run folder" in error(tmp_path / "missing")
    assert "--precision 'fp64'" in error(tmp_path, "--precision", "fp64")
    with socket.socket() as busy:  # checked before the model loads
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in error(tmp_path, "--port", port)
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    assert error(tmp_path) == "error: dmd2 serve needs gradio: pip install 'dmd2[serve]'"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


# ---------------------------------------------------------------------------------------------
# The real server in a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(proc: subprocess.Popen, url: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dmd2 serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with DIRECT.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"dmd2 serve did not answer on {url} within {timeout} s")


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1000,1050"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _type(field, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if text:
        field.send_keys(text)


def _png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="no headless Chromium: apt-get install chromium chromium-driver (.ci/run does)")
def test_page_in_headless_chromium_draws_what_sample_draws(sd15_run, tmp_path):
    pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium: pip install -e '.[dev]'")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def page(d) -> tuple[str, int]:
        """(status line, images shown), read afresh: Gradio re-renders both on every answer."""
        return d.find_element(By.ID, "status").text, len(d.find_elements(By.CSS_SELECTOR, "#images img"))

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = cli_env(GRADIO_TEMP_DIR=tmp_path / "gradio", GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:  # a file, not a pipe nobody reads while the test runs
        server = subprocess.Popen(cli_cmd("serve", sd15_run, "--port", port), cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    # dmd2 sample draws the reference while the server loads
    sample = subprocess.run(cli_cmd("sample", sd15_run, "--prompt", "a red circle", "--seed", 7, "--num-images", 3,
                                    "--out", tmp_path / "sample"), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    driver = None
    try:
        assert sample.returncode == 0, sample.stderr[-3000:]
        _wait_until_serving(server, url, log)
        driver = _browser(tmp_path / "chromium-profile")
        wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(url)
        # the whole form at once: Gradio renders it component by component, so the prompt box can be
        # there before the seed field (a clean-clone run failed on "#seed input" that way)
        prompt, seed, count, timesteps = wait.until(lambda d: [d.find_element(By.CSS_SELECTOR, c) for c in (
            "#prompt textarea", "#seed input", "#num-images input", "#timesteps textarea")])
        generate = wait.until(lambda d: d.find_element(By.ID, "generate"))
        assert timesteps.get_attribute("value") == "999, 499"

        _type(prompt, "a red circle")
        _type(seed, "7")
        _type(count, "3")
        generate.click()
        wait.until(lambda d: "seeds 7..9" in page(d)[0] and page(d)[1] == 3)
        status = page(driver)[0]
        assert "timesteps 999, 499" in status and "generator" in status and "decoder (VAE)" in status
        srcs = [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "#images img")]
        assert all(s.startswith(url) for s in srcs), srcs
        worst = 0
        for i, src in enumerate(srcs):
            with DIRECT.open(src, timeout=10) as r:
                shown = _png(r.read())
            written = _png((tmp_path / "sample" / f"{i:06d}.png").read_bytes())
            assert shown.shape == written.shape == (32, 32, 3)
            worst = max(worst, int(np.abs(shown - written).max()))
        assert worst <= PIXEL_TOL, f"page vs dmd2 sample: max pixel difference {worst} of 255"
        print(f"page vs dmd2 sample: max pixel difference {worst} of 255")
        time.sleep(0.5)  # let the gallery finish painting before the screenshot
        driver.save_screenshot(str(tmp_path / "serve.png"))
        if os.environ.get("DMD2_SCREENSHOT"):
            shutil.copy(tmp_path / "serve.png", os.environ["DMD2_SCREENSHOT"])

        # bad input: a visible message, no images, and the server keeps serving
        _type(prompt, "")
        generate.click()
        wait.until(lambda d: page(d) == ("Error: Type a prompt: this is a text-to-image (sd15) model.", 0))
        _type(prompt, "blue stripes")
        _type(count, "50")
        generate.click()
        wait.until(lambda d: "Error: Number of images must be 1..8 (got 50)" in page(d)[0])

        # one step: the page shows the timestep it will use, then draws with it
        driver.find_element(By.CSS_SELECTOR, "#steps input[value='1']").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#timesteps textarea").get_attribute("value") == "999")
        _type(count, "2")
        generate.click()
        wait.until(lambda d: "seeds 7..8 · timesteps 999 ·" in page(d)[0] and page(d)[1] == 2)
        assert server.poll() is None
    except Exception:
        if driver is not None:  # what the page showed, for the failure report
            driver.save_screenshot(str(tmp_path / "failure.png"))
            print(f"page at the failure: {tmp_path / 'failure.png'}")
        print("dmd2 serve's output:\n" + log.read_text()[-3000:])
        raise
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
