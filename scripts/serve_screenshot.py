"""The README's `dmd2 serve` screenshot (docs/serve.png): start `dmd2 serve RUN`, type a prompt into
the page in headless Chromium, generate, and save what the page shows.

    python scripts/serve_screenshot.py runs/bench-quality/digits-t2i_student_4step \\
        --prompt "a handwritten digit 7" --out docs/serve.png

Needs Debian's chromium + chromium-driver and selenium (`.ci/run` installs them), as the browser
test in tests/test_serve.py does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder or a dmd2 export folder")
    ap.add_argument("--prompt", default="a handwritten digit 7")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--num-images", default="8")
    ap.add_argument("--out", default=str(REPO / "docs" / "serve.png"))
    args = ap.parse_args()

    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    tmp = Path(tempfile.mkdtemp())
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost",
           "GRADIO_TEMP_DIR": str(tmp / "gradio"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "dmd2", "serve", args.run, "--port", str(port)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    driver = None
    try:
        for _ in range(180):
            if server.poll() is not None:
                sys.exit(f"dmd2 serve exited with {server.returncode}")
            try:
                with DIRECT.open(url, timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                     f"--user-data-dir={tmp / 'profile'}", "--window-size=1000,1050"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(url)
        fields = {"prompt": "#prompt textarea", "seed": "#seed input", "num": "#num-images input"}
        values = {"prompt": args.prompt, "seed": args.seed, "num": args.num_images}
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, fields["prompt"]))
        for key, css in fields.items():
            field = driver.find_element(By.CSS_SELECTOR, css)
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(Keys.DELETE)
            field.send_keys(values[key])
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images img")) == int(args.num_images))
        time.sleep(1.0)  # let the gallery finish painting
        driver.save_screenshot(args.out)
        print(args.out)
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
