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


def wait_for_css(browser, selector: str, timeout: float = 30):
    return WebDriverWait(browser, timeout).until(lambda _: browser.find_elements(By.CSS_SELECTOR, selector))[0]


def authorize_in_docs(browser, key: str) -> None:
    """Swagger UI's Authorize dialog: log out of a key entered before, enter this one, close."""
    wait_for_css(browser, ".swagger-ui .btn.authorize").click()
    dialog = wait_for_css(browser, ".swagger-ui .modal-ux")
    for logout in dialog.find_elements(By.XPATH, ".//button[normalize-space()='Logout']"):
        logout.click()
    dialog.find_element(By.CSS_SELECTOR, "input").send_keys(key)
    dialog.find_element(By.XPATH, ".//button[normalize-space()='Authorize']").click()
    dialog.find_element(By.XPATH, ".//button[normalize-space()='Close']").click()


def try_it_out(browser, operation_id: str) -> str:
    """Expand an operation, "Try it out", "Execute": the status of the answer shown."""
    operation = wait_for_css(browser, f"#{operation_id}")
    if not operation.find_elements(By.CSS_SELECTOR, ".opblock-body"):
        operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    try_button = wait_for_css(browser, f"#{operation_id} .try-out__btn")
    if try_button.text == "Try it out":
        try_button.click()
    for clear in operation.find_elements(By.CSS_SELECTOR, ".btn-clear"):
        clear.click()
    shown = f"#{operation_id} .live-responses-table .response .response-col_status"
    WebDriverWait(browser, 10).until(lambda _: not browser.find_elements(By.CSS_SELECTOR, shown))
    wait_for_css(browser, f"#{operation_id} .execute").click()
    return wait_for_css(browser, shown).text


def test_the_docs_load_without_a_prompt_and_take_the_key_in_authorize(browser, live_server):
    browser.get(f"{live_server.url}/")
    browser.execute_script("localStorage.clear();")
    browser.get(f"{live_server.url}/docs")
    # A window.prompt would make every further command fail with UnexpectedAlertPresentException.
    title = wait_for_css(browser, ".swagger-ui .info .title")
    assert "image generation API" in title.text
    operations = browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock")
    assert len(operations) >= 10 and browser.find_elements(By.ID, "operations-default-post_jobs")

    assert try_it_out(browser, "operations-default-get_info") == "401"
    authorize_in_docs(browser, "not-the-key")
    assert try_it_out(browser, "operations-default-get_info") == "401"
    # A wrong key is not a dead end: log out, enter the right one.
    authorize_in_docs(browser, API_KEY)
    assert try_it_out(browser, "operations-default-get_info") == "200"
    # The key entered stays for the next visit.
    browser.refresh()
    assert try_it_out(browser, "operations-default-get_info") == "200"
