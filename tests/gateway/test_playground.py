"""The playground page in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium):
paste a key, generate with progress and partial previews, make a variation, paint a mask and edit; the
<img> elements decode to PNGs of the asked size. A screenshot is saved under the test's tmp_path."""

from __future__ import annotations

import base64
import io
import shutil
import tempfile

import numpy as np
import PIL.Image
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; "
    ".ci/run installs them)",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1200,1400",
]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="unclip-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def png_size(data_url: str) -> tuple[int, int]:
    assert data_url.startswith("data:image/png;base64,")
    image = PIL.Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    assert image.format == "PNG"
    return image.size


def pixels(data_url: str) -> np.ndarray:
    image = PIL.Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    return np.asarray(image.convert("RGB")).astype(int)


def test_playground_generate_vary_edit(browser, gateway, api_key, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(gateway + "/")
    find = browser.find_element

    # The key is pasted once and kept in the browser's storage only.
    find(By.ID, "api-key").send_keys(api_key)
    find(By.ID, "save-key").click()
    assert browser.execute_script("return localStorage.getItem('unclip.apiKey')") == api_key
    wait.until(lambda d: len(Select(d.find_element(By.ID, "size")).options) == 3)
    Select(find(By.ID, "size")).select_by_value("128x128")

    # Generate one image (streamed: progress and partial previews), few steps.
    find(By.ID, "prompt").send_keys("a red circle on a blue background")
    find(By.ID, "seed").send_keys("21")
    find(By.CSS_SELECTOR, "#sampling summary").click()
    for name in ("prior_num_inference_steps", "decoder_num_inference_steps", "super_res_num_inference_steps"):
        find(By.ID, name).send_keys("2")
    find(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card"))
    assert find(By.ID, "status").text == "done"
    assert browser.execute_script("return document.getElementById('progress').value") == 1
    previews = find(By.ID, "previews").find_elements(By.TAG_NAME, "img")
    assert [png_size(p.get_attribute("src")) for p in previews] == [(32, 32), (64, 64)]
    generate_previews = [p.get_attribute("src") for p in previews]
    card = find(By.CSS_SELECTOR, "#gallery .card")
    assert card.get_attribute("data-seed") == "21" and "seed 21" in card.text
    original = card.find_element(By.TAG_NAME, "img").get_attribute("src")
    assert png_size(original) == (128, 128)
    assert card.find_element(By.CSS_SELECTOR, "a.download").get_attribute("download") == "unclip-21.png"

    # A variation of it.
    card.find_element(By.CSS_SELECTOR, "button.vary").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 2)
    varied = find(By.CSS_SELECTOR, "#gallery .card[data-how=variation] img").get_attribute("src")
    assert png_size(varied) == (128, 128)

    # Edit: paint the top-left corner of the original (transparent = regenerate), describe, submit.
    find(By.CSS_SELECTOR, "#gallery .card[data-how=generated] button.edit").click()
    wait.until(lambda d: d.find_element(By.ID, "editor").get_attribute("data-ready") == "1")
    canvas = find(By.ID, "mask-canvas")  # 256 css px showing 128 image px
    chain = ActionChains(browser).move_to_element_with_offset(canvas, -100, -100).click_and_hold()
    for step in range(8):
        chain.move_to_element_with_offset(canvas, -100 + 10 * step, -100 + 5 * (step % 2))
    chain.release().perform()
    find(By.ID, "edit-prompt").send_keys("a yellow star")
    find(By.ID, "edit-submit").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card[data-how=edit]"))
    assert find(By.ID, "status").text == "done", find(By.ID, "status").text
    edited = find(By.CSS_SELECTOR, "#gallery .card[data-how=edit] img").get_attribute("src")
    assert png_size(edited) == (128, 128)
    # The edit streamed too: its own partial previews replaced the generation's.
    edit_previews = [
        p.get_attribute("src") for p in find(By.ID, "previews").find_elements(By.TAG_NAME, "img")
    ]
    assert [png_size(p) for p in edit_previews] == [(32, 32), (64, 64)]
    assert not set(edit_previews) & set(generate_previews)
    difference = np.abs(pixels(edited) - pixels(original))
    # Far from the painted corner: kept, but for the two pictures' own invisible watermarks (each image's
    # mark follows its seed; PSNR ~40 dB, BENCHMARKS.md "Provenance").
    assert difference[96:, 96:].mean() <= 3
    assert difference[:32, :48].mean() > 5  # the painted corner was regenerated

    screenshot = tmp_path / "playground.png"
    browser.save_screenshot(str(screenshot))
    assert PIL.Image.open(screenshot).size[0] > 0
    print(f"screenshot: {screenshot}")


def status_class(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status").get_attribute("class") or ""


def test_playground_interpolation_slider(browser, gateway, api_key, tmp_path):
    """Two prompts, Interpolate, then the slider scrubs the frames: the shown <img> becomes another frame."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(gateway + "/")
    find = browser.find_element
    key = find(By.ID, "api-key")
    key.clear()
    key.send_keys(api_key)
    find(By.ID, "save-key").click()
    wait.until(lambda d: len(Select(d.find_element(By.ID, "size")).options) == 3)
    Select(find(By.ID, "size")).select_by_value("64x64")
    find(By.ID, "seed").send_keys("13")
    find(By.CSS_SELECTOR, "#sampling summary").click()
    for name in ("prior_num_inference_steps", "decoder_num_inference_steps", "super_res_num_inference_steps"):
        find(By.ID, name).send_keys("2")

    find(By.ID, "start-prompt").send_keys("a red circle")
    find(By.ID, "end-prompt").send_keys("a blue square")
    frames = find(By.ID, "frames")
    frames.clear()
    frames.send_keys("3")
    find(By.ID, "manip-run").click()
    wait.until(lambda d: d.find_element(By.ID, "slider-view").get_attribute("data-count") == "3")
    assert find(By.ID, "status").text == "done", find(By.ID, "status").text
    shown = find(By.ID, "frame")
    first = shown.get_attribute("src")
    assert png_size(first) == (64, 64) and shown.get_attribute("data-index") == "0"
    assert "θ 0.00" in find(By.ID, "frame-label").text

    slider = find(By.ID, "frame-slider")
    slider.send_keys(Keys.ARROW_RIGHT)
    slider.send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda d: d.find_element(By.ID, "frame").get_attribute("data-index") == "2")
    last = shown.get_attribute("src")
    assert png_size(last) == (64, 64) and last != first
    assert np.abs(pixels(last) - pixels(first)).mean() > 0  # another picture, not the same one re-encoded
    assert "θ 1.00" in find(By.ID, "frame-label").text
    assert find(By.ID, "animation").get_attribute("href").startswith("data:image/gif;base64,")

    # Text diff: keep the first frame, take it as the image, captions from/to, and a slider over theta.
    slider.send_keys(Keys.HOME)
    wait.until(lambda d: d.find_element(By.ID, "frame").get_attribute("data-index") == "0")
    find(By.ID, "keep-frame").click()
    card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gallery .card[data-how=frame]"))
    kept = card.find_element(By.TAG_NAME, "img").get_attribute("src")
    assert np.abs(pixels(kept) - pixels(first)).max() == 0
    card.find_element(By.CSS_SELECTOR, "button.as-diff").click()
    assert find(By.ID, "manip-run").text == "Text diff"
    find(By.ID, "from-caption").send_keys("a red circle")
    find(By.ID, "to-caption").send_keys("a green circle")
    find(By.ID, "manip-run").click()  # "drawing 3 frames" until the answer is shown
    wait.until(lambda d: d.find_element(By.ID, "status").text == "done" or "error" in status_class(d))
    assert find(By.ID, "status").text == "done", find(By.ID, "status").text
    assert (
        find(By.ID, "frame").get_attribute("data-index") == "0"
        and "θ 0.00" in find(By.ID, "frame-label").text
    )
    start = shown.get_attribute("src")
    slider.send_keys(Keys.END)
    wait.until(lambda d: d.find_element(By.ID, "frame").get_attribute("data-index") == "2")
    assert "θ 0.50" in find(By.ID, "frame-label").text  # max θ 0.5, the paper's
    moved = shown.get_attribute("src")
    assert png_size(moved) == (64, 64) and np.abs(pixels(moved) - pixels(start)).mean() > 0

    screenshot = tmp_path / "playground-slider.png"
    browser.save_screenshot(str(screenshot))
    assert PIL.Image.open(screenshot).size[0] > 0
    print(f"screenshot: {screenshot}")
