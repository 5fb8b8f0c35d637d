"""The generation page and the API docs in a real headless Chromium, against a real server."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from stable_diffusion.settings import REPO_ROOT
from tests.conftest import API_KEY
from tests.images import png_bytes


@pytest.fixture(scope="module")
def browser(live_server):
    """Depends on the server so that the browser, with its open connections, quits before it stops."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        subprocess.run([REPO_ROOT / "scripts" / "install_chromium.sh"], check=True)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--ignore-certificate-errors"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def element(browser, element_id: str):
    return browser.find_element(By.ID, element_id)


def loaded(browser, element_id: str) -> bool:
    return browser.execute_script(
        "const image = document.getElementById(arguments[0]); return image.complete && image.naturalWidth > 0;",
        element_id,
    )


def fill_form(browser, live_server, tmp_path, key: str) -> None:
    browser.get(f"{live_server.url}/")
    picture = tmp_path / "drawing.png"
    picture.write_bytes(png_bytes())
    element(browser, "api-key").clear()
    element(browser, "api-key").send_keys(key)
    element(browser, "image").send_keys(str(picture))
    element(browser, "prompt").send_keys("a lighthouse on a cliff")
    element(browser, "negative-prompt").send_keys("fog")


def test_a_person_submits_watches_progress_and_downloads_the_result(browser, live_server, tmp_path):
    fill_form(browser, live_server, tmp_path, API_KEY)
    slider = element(browser, "sensitivity")
    for _ in range(4):
        slider.send_keys(Keys.ARROW_LEFT)
    assert element(browser, "sensitivity-value").text == "0.80"
    element(browser, "submit").click()

    wait = WebDriverWait(browser, 90)
    wait.until(lambda _: element(browser, "download").is_displayed())
    assert "succeeded" in element(browser, "status").text
    progress = element(browser, "progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") != "1"
    assert loaded(browser, "result") and loaded(browser, "edges") and loaded(browser, "preview")
    assert element(browser, "preview").get_attribute("src").startswith("data:image/png;base64,")
    assert element(browser, "download").get_attribute("download").endswith(".png")
    assert not element(browser, "error").is_displayed()
    # The key stays in the browser for the next visit.
    browser.refresh()
    assert element(browser, "api-key").get_attribute("value") == API_KEY


def test_api_errors_show_as_readable_messages(browser, live_server, tmp_path):
    fill_form(browser, live_server, tmp_path, "not-the-key")
    element(browser, "submit").click()
    WebDriverWait(browser, 30).until(lambda _: element(browser, "error").is_displayed())
    assert "Invalid API key" in element(browser, "error").text
    assert not element(browser, "download").is_displayed()


def test_the_docs_page_renders_the_contract(browser, live_server):
    browser.get(f"{live_server.url}/")
    browser.execute_script("localStorage.setItem('apiKey', arguments[0]);", API_KEY)
    browser.get(f"{live_server.url}/docs")
    title = WebDriverWait(browser, 30).until(
        lambda _: browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title")
    )
    assert "image generation API" in title[0].text
    assert browser.find_elements(By.CSS_SELECTOR, "[id^='operations-default-post_jobs']")
