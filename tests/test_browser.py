"""The click-for-depth page in a real browser (issue 16): headless Chromium (Debian's `chromium` and
`chromium-driver`; `.ci/run` installs them) loads the page from a live `spd serve` on 127.0.0.1,
uploads a real NYU frame, clicks two points and reads the two depths the page shows."""

import shutil
from pathlib import Path

import numpy as np
import pytest

import spd

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")

FRAME = Path(__file__).parent / "fixtures" / "nyu_real" / "sync" / "rgb_00100.jpg"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    from spd.serve.loadcheck import free_port, start_server

    folder = spd.save_model(tiny_model, tmp_path_factory.mktemp("serve") / "model")
    port = free_port()
    process = start_server(str(folder), port, [])
    url = f"http://127.0.0.1:{port}"
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_shows_the_predictors_depths_at_two_clicked_points(server, browser, tiny_model):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    browser.find_element(By.ID, "file").send_keys(str(FRAME))
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-image-id"))
    canvas = browser.find_element(By.ID, "view")
    for dx, dy in ((-150, -80), (120, 90)):  # offsets from the canvas centre, in CSS pixels
        ActionChains(browser).move_to_element_with_offset(canvas, dx, dy).click().perform()
    # Read the table in one script call (the page redraws it on every answer: no stale elements).
    table = """
        if (document.body.dataset.pending !== "0") return null;
        const rows = [...document.querySelectorAll("#rows tr")].map(r =>
            ["u", "v", "depth"].map(c => r.querySelector("td." + c).textContent));
        return rows.length === 2 && rows.every(r => r[2] !== "") ? rows : null;"""
    rows = np.array(wait.until(lambda b: b.execute_script(table)), dtype=np.float64)
    points, shown = rows[:, :2], rows[:, 2]
    assert points[0, 0] < points[1, 0] and points[0, 1] < points[1, 1]  # the two clicks, where they were made
    want = spd.Predictor(tiny_model).predict(str(FRAME), points)
    np.testing.assert_allclose(shown, want, atol=0.0005 + 1e-6, rtol=0)  # equal to 3 decimals
