"""The serve page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium)
opens the page, generates a digit, waits for the previews and the final image, and saves a screenshot.

Skips with the reason when chromium, chromedriver, selenium or the serve extra is missing, except under
DAR_FAST_REQUIRE_BROWSER=1 (CI installs them), where a missing piece fails the run instead.
Screenshots go to $DAR_FAST_ARTIFACTS (default: pytest's tmp dir); DAR_FAST_UPDATE_SCREENSHOT=1 also writes
docs/serve_page.png (the README's picture).
"""
import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("DAR_FAST_REQUIRE_BROWSER") == "1":      # CI: a missing browser must fail, not skip
    import fastapi  # noqa: F401
    import selenium.webdriver as webdriver
    import uvicorn  # noqa: F401
    assert shutil.which("chromium") and shutil.which("chromedriver"), "DAR_FAST_REQUIRE_BROWSER=1 but no chromium"
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
if not CHROMIUM or not DRIVER:
    pytest.skip("headless browser test needs chromium and chromedriver on PATH "
                "(Debian: apt-get install -y chromium chromium-driver)", allow_module_level=True)

from PIL import Image  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from dar_fast.io import atomic_write  # noqa: E402
from dar_fast.pipeline import Pipeline  # noqa: E402
from dar_fast.serve import create_app  # noqa: E402
from dar_fast.serve.server import serve_in_thread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app_url():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained("digits", device="cpu")
    app = create_app(pipe, max_batch=16, max_queue=64, defaults={"cfg": 2.0})
    with serve_in_thread(app) as url:
        yield url, pipe
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,760",
              "--force-device-scale-factor=1"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _save(png: bytes, name: str, tmp_path):
    out = Path(os.environ.get("DAR_FAST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / name, lambda f: f.write(png))
    return out / name


def _pixels(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def test_page_generates_a_digit_with_previews(app_url, browser, tmp_path):
    url, pipe = app_url
    browser.get(url + "/")
    Select(browser.find_element(By.ID, "cls")).select_by_visible_text("0")
    seed = browser.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("1")
    assert browser.find_element(By.ID, "cfg").get_attribute("value") == "2"        # the model's default cfg
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 120).until(
        lambda d: d.find_element(By.ID, "final").get_attribute("data-final") == "1"
        or "err" in d.find_element(By.ID, "status").get_attribute("class"))
    status = browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "final").get_attribute("data-final") == "1", status
    previews = browser.find_elements(By.CSS_SELECTOR, "#strip img.preview")
    assert len(previews) == 4, status                                 # one per group
    assert status.startswith("done in")
    final = browser.find_element(By.ID, "final")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", final) == 32
    # the page shows the server's image: the same pixels as Pipeline.sample with that class and seed
    ref = Pipeline.from_pretrained("digits", device="cpu").sample([0], cfg=2.0, seed=1)
    assert np.array_equal(_pixels(final.get_attribute("src")), ref.images[0].numpy())
    assert np.array_equal(_pixels(previews[-1].get_attribute("src")), ref.images[0].numpy())
    assert not np.array_equal(_pixels(previews[0].get_attribute("src")), ref.images[0].numpy())
    assert browser.find_element(By.ID, "download").get_attribute("href").startswith("data:image/png;base64,")
    png = browser.get_screenshot_as_png()
    path = _save(png, "serve_page.png", tmp_path)
    assert Image.open(path).size[0] >= 900
    if os.environ.get("DAR_FAST_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        atomic_write(ROOT / "docs" / "serve_page.png", lambda f: f.write(png))


def test_page_reference_image_sets_prefix(app_url, browser, tmp_path):
    url, pipe = app_url
    ref = Pipeline.from_pretrained("digits", device="cpu").sample([2], cfg=2.0, seed=9)
    src = tmp_path / "ref.png"
    Image.fromarray(ref.images[0].numpy()).save(src)
    browser.get(url + "/")
    browser.find_element(By.ID, "file").send_keys(str(src))
    WebDriverWait(browser, 60).until(lambda d: "reference encoded" in d.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "prefix").get_attribute("value") == "8"
    Select(browser.find_element(By.ID, "cls")).select_by_visible_text("2")
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "final").get_attribute("data-final") == "1")
    # 8 prefix tokens of the reference, then the model's own: Pipeline.sample with that prefix
    prefix = Pipeline.from_pretrained("digits", device="cpu").encode(ref.images[:1])[:, :8]
    want = Pipeline.from_pretrained("digits", device="cpu").sample([2], cfg=2.0, seed=0, prefix_tokens=prefix)
    got = _pixels(browser.find_element(By.ID, "final").get_attribute("src"))
    assert np.array_equal(got, want.images[0].numpy())
    _save(browser.get_screenshot_as_png(), "serve_page_reference.png", tmp_path)
