"""The web page of ``maskworks serve`` in a real headless Chromium (Selenium 4, Debian's chromium + chromedriver).

The app runs in-process under uvicorn on a free loopback port with two things to serve: a tiny U-Net trained for
two epochs on the synthetic shapes (through the CLI), and an "oracle" SAM whose decoder returns the ground-truth
object under the first positive point (or the box centre), so that what the page draws can be checked pixel by
pixel against the shapes the test painted. Canvas pixels are read back with ``canvas.toDataURL()``.

Skipped only when the chromium / chromedriver binaries or the selenium package are missing.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskworks.models.promptable import ResizeLongestSide, Sam, build_sam
from maskworks.testing import TINY_SAM

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
except ImportError:  # pragma: no cover - depends on the machine
    webdriver = None

# The test image: a red disc and a blue rectangle on a dark, slightly grainy background. Coordinates are continuous
# original-image pixels (pixel (i, j) covers [j, j + 1) x [i, i + 1), its centre at (j + 0.5, i + 0.5)).
W, H = 160, 120
DISC = (48.0, 60.0, 26.0)  # cx, cy, r
RECT = (96.0, 24.0, 144.0, 84.0)  # x0, y0, x1, y1
DISC_RGB = (220, 60, 50)
RECT_RGB = (60, 90, 220)
SAM_TINT = np.array([30, 144, 255])  # the page's mask colour (app.js MASK_RGB)


def in_disc(x, y, margin: float = 0.0):
    cx, cy, r = DISC
    return (x - cx) ** 2 + (y - cy) ** 2 <= (r + margin) ** 2


def in_rect(x, y, margin: float = 0.0):
    x0, y0, x1, y1 = RECT
    return (x >= x0 - margin) & (x < x1 + margin) & (y >= y0 - margin) & (y < y1 + margin)


SHAPES = (in_disc, in_rect)


def make_image() -> np.ndarray:
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    rng = np.random.default_rng(0)
    image = rng.integers(40, 56, (H, W, 3)).astype(np.uint8)
    image[in_disc(xs, ys)] = DISC_RGB
    image[in_rect(xs, ys)] = RECT_RGB
    return image


class OracleSam(Sam):
    """A tiny SAM whose decoder knows the answer: the shape under the first positive point (else under the box
    centre) as +10 / -10 logits in the low-resolution frame. With three masks the candidates are (empty, object,
    everything) with predicted IoUs (0.2, 0.9, 0.1), so a page that shows mask 0 instead of ``best`` is caught."""

    def __init__(self, original_size: tuple[int, int]):
        base = build_sam(**TINY_SAM)
        super().__init__(base.image_encoder, base.prompt_encoder, base.mask_decoder)
        self.original_size = original_size
        self.calls: list[dict] = []

    def _object(self, xs: torch.Tensor, ys: torch.Tensor, x: float, y: float) -> torch.Tensor:
        for shape in SHAPES:
            if shape(torch.tensor(x), torch.tensor(y)):
                return shape(xs, ys)
        return torch.zeros_like(xs, dtype=torch.bool)

    def decode(
        self, features, point_coords=None, point_labels=None, boxes=None, mask_input=None, multimask_output=True
    ):
        h, w = self.original_size
        nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, self.image_size)
        sx, sy = nw / w, nh / h  # original pixels -> the model's input frame (as ResizeLongestSide.apply_coords)
        low = 4 * features.shape[-1]  # postprocess_masks upsamples (low x low) to the padded input
        centres = (torch.arange(low, dtype=torch.float) + 0.5) * self.image_size / low  # cell centres, input frame
        ys, xs = torch.meshgrid(centres / sy, centres / sx, indexing="ij")  # ... in original pixels
        batch = point_coords.shape[0] if point_coords is not None else boxes.shape[0]
        logits, ious = [], []
        for b in range(batch):
            points = [] if point_coords is None else (point_coords[b].cpu() / torch.tensor([sx, sy])).tolist()
            labels = [] if point_labels is None else point_labels[b].cpu().tolist()
            box = None if boxes is None else (boxes[b].cpu().view(2, 2) / torch.tensor([sx, sy])).view(4).tolist()
            self.calls.append({"points": points, "labels": labels, "box": box, "multimask": multimask_output})
            positive = [p for p, lab in zip(points, labels) if lab == 1]
            if positive:
                target = positive[0]
            elif box is not None:
                target = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            else:
                target = (-1.0, -1.0)
            obj = torch.where(self._object(xs, ys, *target), 10.0, -10.0)
            if multimask_output:
                logits.append(torch.stack([torch.full_like(obj, -10.0), obj, torch.full_like(obj, 10.0)]))
                ious.append(torch.tensor([0.2, 0.9, 0.1]))
            else:
                logits.append(obj[None])
                ious.append(torch.tensor([0.9]))
        return torch.stack(logits).to(features.device), torch.stack(ious).to(features.device)


# ---------------------------------------------------------------------------------------------------------- fixtures


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """An app under uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{self.port}")

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"real-browser test needs Debian's chromium and chromium-driver: {', '.join(missing)} not found")
    if webdriver is None:
        pytest.skip("real-browser test needs the selenium package (pip install selenium)")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    from maskworks.cli.main import main
    from maskworks.serve import ServedModel

    run = tmp_path_factory.mktemp("serve_browser") / "run"
    args = ["train", "--data", "synthetic", "--model", "unet_vanilla", "--no-progress", "--epochs", "2"]
    for override in (
        "model.features=[8,16,32]",
        "data.image_size=64",
        "data.num_train=32",
        "data.num_val=8",
        "train.batch_size=8",
        "train.device=cpu",
    ):
        args += ["--set", override]
    assert main([*args, "--run-dir", str(run)]) == 0
    return ServedModel.from_checkpoint(run / "best.safetensors", name="shapes")


@pytest.fixture(scope="module")
def oracle():
    return OracleSam((H, W)).eval()


@pytest.fixture(scope="module")
def live(shapes_model, oracle):
    from maskworks.serve import SamService, ServeSettings, create_app

    app = create_app({"shapes": shapes_model}, sam=SamService(oracle, cache_size=4), settings=ServeSettings())
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve_images") / "shapes.png"
    Image.fromarray(make_image()).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------- helpers


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def page_state(driver) -> dict:
    return js(
        driver,
        "const s = document.getElementById('status');"
        "return {result: document.body.dataset.result || '', embed: document.body.dataset.embed || '',"
        " state: s.dataset.state, text: s.textContent};",
    )


def wait_for(driver, condition, what: str, shot: Path, timeout: float = 10.0, errors_fail: bool = True) -> dict:
    """Poll ``condition(page_state)`` until true; fail at once on ``data-state="error"`` (with a screenshot)."""
    deadline = time.monotonic() + timeout
    while True:
        state = page_state(driver)
        if errors_fail and state["state"] == "error":
            driver.save_screenshot(str(shot))
            raise AssertionError(f"{what}: the page reports an error: {state['text']!r} (screenshot {shot})")
        if condition(state):
            return state
        if time.monotonic() > deadline:
            driver.save_screenshot(str(shot))
            raise AssertionError(f"{what}: not done after {timeout:g} s; page state {state} (screenshot {shot})")
        time.sleep(0.05)


def wait_for_result(driver, previous: str, what: str, shot: Path) -> dict:
    return wait_for(driver, lambda s: s["result"] != previous and s["state"] == "done", what, shot)


def open_page(driver, url: str, shot: Path) -> None:
    driver.get(url + "/")
    wait_for(
        driver,
        lambda s: s["state"] != "busy" and js(driver, "return document.getElementById('model').options.length") > 0,
        "loading /models",
        shot,
    )


def canvas_pixels(driver) -> np.ndarray:
    """The canvas backing store as ``(h, w, 3)`` uint8 (alpha dropped)."""
    url = js(driver, "return document.getElementById('canvas').toDataURL('image/png');")
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def canvas_geometry(driver) -> dict:
    return js(
        driver,
        "const c = document.getElementById('canvas'); const r = c.getBoundingClientRect();"
        "return {width: c.width, height: c.height, cssWidth: r.width, cssHeight: r.height};",
    )


def canvas_grid(geometry: dict) -> tuple[np.ndarray, np.ndarray]:
    """Original-image coordinates of every canvas pixel centre."""
    ch, cw = geometry["height"], geometry["width"]
    ys, xs = np.mgrid[0:ch, 0:cw] + 0.5
    return xs * W / cw, ys * H / ch


def click_at(driver, x: float, y: float, button: str = "left") -> None:
    """Click the canvas at original-image pixel ``(x, y)`` (Selenium 4 offsets are from the element's centre)."""
    canvas = driver.find_element(By.ID, "canvas")
    g = canvas_geometry(driver)
    ox = round(x * g["cssWidth"] / W - g["cssWidth"] / 2)
    oy = round(y * g["cssHeight"] / H - g["cssHeight"] / 2)
    chain = ActionChains(driver).move_to_element_with_offset(canvas, ox, oy)
    (chain.context_click() if button == "right" else chain.click()).perform()


def drag(driver, start: tuple[float, float], end: tuple[float, float]) -> None:
    canvas = driver.find_element(By.ID, "canvas")
    g = canvas_geometry(driver)
    sx, sy = g["cssWidth"] / W, g["cssHeight"] / H
    ox, oy = round(start[0] * sx - g["cssWidth"] / 2), round(start[1] * sy - g["cssHeight"] / 2)
    dx, dy = round((end[0] - start[0]) * sx), round((end[1] - start[1]) * sy)
    chain = ActionChains(driver).move_to_element_with_offset(canvas, ox, oy).click_and_hold()
    chain.move_by_offset(dx // 2, dy // 2).move_by_offset(dx - dx // 2, dy - dy // 2).release().perform()


def decode_data_url(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


# ------------------------------------------------------------------------------------------------------------- tests


def test_semantic_overlay_legend_and_opacity(browser, live, shapes_model, image_file, tmp_path):
    shot = tmp_path / "semantic.png"
    open_page(browser, live.url, tmp_path / "semantic_load.png")
    model = Select(browser.find_element(By.ID, "model"))
    labels = [o.text for o in model.options]
    assert labels[0] == "shapes (semantic)" and "SAM — click to segment" in labels, labels
    model.select_by_value("shapes")
    before = page_state(browser)["result"]

    browser.find_element(By.ID, "file").send_keys(str(image_file))
    state = wait_for_result(browser, before, "semantic prediction", tmp_path / "semantic_wait.png")
    assert state["result"].startswith("semantic:"), state
    browser.save_screenshot(str(shot))

    geometry = canvas_geometry(browser)
    assert geometry["width"] > W and abs(geometry["width"] / geometry["height"] - W / H) < 0.02, geometry
    legend = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#legend li")]
    assert legend and all(t.endswith("%") for t in legend), f"legend {legend} (screenshot {shot})"
    shares = [float(t.rsplit(None, 2)[-2]) for t in legend]
    assert shares == sorted(shares, reverse=True) and 99 <= sum(shares) <= 101 and min(shares) > 0, legend
    with_overlay = canvas_pixels(browser).astype(int)

    slider = browser.find_element(By.ID, "opacity")
    slider.send_keys(Keys.HOME)  # a real key press on the range input: value 0, an input event
    assert slider.get_attribute("value") == "0"
    plain = canvas_pixels(browser).astype(int)
    browser.save_screenshot(str(tmp_path / "semantic_opacity0.png"))

    # at opacity 0 the canvas shows the image alone: compare with the image resized to the canvas
    expected = np.asarray(
        Image.open(image_file).resize((geometry["width"], geometry["height"]), Image.Resampling.BILINEAR)
    ).astype(int)
    xs, ys = canvas_grid(geometry)
    inner = ~(in_disc(xs, ys, 2) & ~in_disc(xs, ys, -2)) & ~(in_rect(xs, ys, 2) & ~in_rect(xs, ys, -2))
    err = np.abs(plain - expected)[inner].mean()
    assert err < 6, f"opacity 0: canvas differs from the plain image by {err:.1f} on average (screenshot {shot})"
    # the overlay (the class colours at 50 %) changed the canvas: the class colours are not the image's
    changed = (np.abs(with_overlay - plain).max(axis=-1) > 12).mean()
    assert changed > 0.5, f"the overlay changed only {changed:.0%} of the canvas (screenshot {shot})"
    assert np.abs(with_overlay - plain).mean() > 8

    slider.send_keys(Keys.END)  # back to 100 %: the canvas shows the class colours alone
    palette = {tuple(int(v) for v in c) for c in shapes_model.palette}
    opaque = canvas_pixels(browser)
    colours, counts = np.unique(opaque[inner].reshape(-1, 3), axis=0, return_counts=True)
    top = {tuple(int(v) for v in c) for c in colours[counts > 0.01 * counts.sum()]}
    assert top <= palette, f"at opacity 100 the canvas shows {top}, not palette colours {palette} (screenshot {shot})"

    # dropping a file on the drop zone (a synthetic drop event carrying the PNG) predicts it again
    previous = page_state(browser)["result"]
    js(
        browser,
        "const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));"
        "const dt = new DataTransfer(); dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
        "document.getElementById('drop').dispatchEvent("
        "  new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));",
        base64.b64encode(image_file.read_bytes()).decode(),
    )
    wait_for_result(browser, previous, "prediction of a dropped file", tmp_path / "semantic_drop.png")
    assert "dropped.png" in browser.find_element(By.ID, "file-name").text


def test_sam_click_right_click_box_and_download(browser, live, oracle, image_file, tmp_path):
    open_page(browser, live.url, tmp_path / "sam_load.png")
    Select(browser.find_element(By.ID, "model")).select_by_value("__sam__")
    assert not browser.find_element(By.ID, "download").is_displayed(), "download link shown before any mask"
    browser.find_element(By.ID, "file").send_keys(str(image_file))
    wait_for(browser, lambda s: s["embed"] and s["state"] == "done", "SAM embedding", tmp_path / "sam_embed.png")
    geometry = canvas_geometry(browser)
    xs, ys = canvas_grid(geometry)
    plain = canvas_pixels(browser).astype(int)
    scale = geometry["width"] / W
    alpha = int(browser.find_element(By.ID, "opacity").get_attribute("value")) / 100
    assert alpha >= 0.25, f"overlay opacity {alpha:.0%} is too low to see the mask"
    oracle.calls.clear()

    # left click inside the disc, off its centre: the object mask, drawn over the disc only
    cx, cy, r = DISC
    click = (cx - 8, cy + 5)
    shot = tmp_path / "sam_click.png"
    previous = page_state(browser)["result"]
    click_at(browser, *click)
    state = wait_for_result(browser, previous, "SAM mask after a left click", shot)
    assert state["result"].startswith("sam:"), state
    browser.save_screenshot(str(shot))
    call = oracle.calls[-1]
    assert call["labels"] == [1] and call["box"] is None and call["multimask"], call
    assert np.hypot(call["points"][0][0] - click[0], call["points"][0][1] - click[1]) < 1.5, (call, click)

    masked = canvas_pixels(browser).astype(int)
    marker = np.hypot(xs - click[0], ys - click[1]) * scale < 12  # the point marker (radius 6 canvas px)
    inside = in_disc(xs, ys, -3) & ~marker
    outside = ~in_disc(xs, ys, 3) & ~marker
    tinted = np.abs(masked - (1 - alpha) * plain - alpha * SAM_TINT).max(axis=-1) < 12  # the mask colour blended
    assert tinted[inside].mean() > 0.97, (
        f"mask drawn over {tinted[inside].mean():.0%} of the disc only (screenshot {shot})"
    )
    unchanged = np.abs(masked - plain).max(axis=-1) <= 2
    assert unchanged[outside].mean() > 0.99, f"the canvas changed outside the clicked disc (screenshot {shot})"
    assert (np.abs(masked - plain)[marker].max(axis=-1) > 40).any(), "no point marker drawn at the click"

    download = browser.find_element(By.ID, "download")
    href = download.get_attribute("href")
    assert download.is_displayed() and href.startswith("data:image/png"), f"download href {href[:40]!r} ({shot})"
    mask = decode_data_url(href) > 127
    gy, gx = np.mgrid[0:H, 0:W] + 0.5
    truth = in_disc(gx, gy)
    assert mask.shape == (H, W) and (mask & truth).sum() / (mask | truth).sum() > 0.9, "download is not the disc"

    # right click on the background: a negative point, a new result (same object for the oracle)
    shot = tmp_path / "sam_right_click.png"
    previous = state["result"]
    click_at(browser, 20, 100, button="right")
    state = wait_for_result(browser, previous, "SAM mask after a right click", shot)
    browser.save_screenshot(str(shot))
    call = oracle.calls[-1]
    assert call["labels"] == [1, 0] and np.allclose(call["points"][1], (20, 100), atol=1.5), call
    red_marker = np.hypot(xs - 20, ys - 100) * scale < 3
    assert (canvas_pixels(browser)[red_marker] == (255, 45, 45)).all(axis=-1).any(), f"no red marker ({shot})"

    # clear, then drag a box around the rectangle: the rectangle's mask
    shot = tmp_path / "sam_box.png"
    browser.find_element(By.ID, "clear").click()
    assert js(browser, "return document.getElementById('legend').children.length") == 0
    assert np.abs(canvas_pixels(browser).astype(int) - plain).max() <= 2, "clear left drawings on the canvas"
    previous = state["result"]
    x0, y0, x1, y1 = RECT
    drag(browser, (x0 - 4, y0 - 4), (x1 + 4, y1 + 4))
    wait_for_result(browser, previous, "SAM mask for a box", shot)
    browser.save_screenshot(str(shot))
    call = oracle.calls[-1]
    assert call["points"] == [] and call["box"] is not None, call
    assert np.allclose(call["box"], (x0 - 4, y0 - 4, x1 + 4, y1 + 4), atol=2), call
    mask = decode_data_url(browser.find_element(By.ID, "download").get_attribute("href")) > 127
    truth = in_rect(gx, gy)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9, f"the box gave no rectangle mask (screenshot {shot})"


def test_token_prompt(browser, shapes_model, tmp_path):
    from maskworks.serve import ServeSettings, create_app

    shot = tmp_path / "token.png"
    with LiveServer(create_app({"shapes": shapes_model}, settings=ServeSettings(token="s3cret"))) as server:
        browser.get(server.url + "/")
        js(browser, "localStorage.clear();")
        browser.refresh()
        wait_for(browser, lambda s: s["state"] == "error", "the 401 on /models", shot, errors_fail=False)
        state = page_state(browser)
        browser.save_screenshot(str(tmp_path / "token_prompt.png"))
        assert "401" in state["text"], state
        token = browser.find_element(By.ID, "token")
        assert token.is_displayed(), f"no token field after a 401 (screenshot {tmp_path / 'token_prompt.png'})"
        token.send_keys("s3cret")
        browser.find_element(By.ID, "token-save").click()
        wait_for(
            browser,
            lambda s: js(browser, "return document.getElementById('model').value") == "shapes",
            "models after entering the token",
            shot,
        )
        assert not token.is_displayed()
        assert js(browser, "return localStorage.getItem('maskworks.token')") == "s3cret"
        browser.save_screenshot(str(shot))
        js(browser, "localStorage.clear();")
