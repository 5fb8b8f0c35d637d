"""The generation page and the API docs in a real headless Chromium, against a real server."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest
import requests
from PIL import Image, ImageDraw
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from service.settings import REPO_ROOT
from stable_diffusion.pipeline_runner import SCHEDULERS
from tests.conftest import API_KEY
from tests.images import drawing, encode, png_bytes


@pytest.fixture(scope="module")
def browser(live_server):
    """Depends on the server so that the browser, with its open connections, quits before it stops."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        subprocess.run([REPO_ROOT / "scripts" / "install_chromium.sh"], check=True)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--ignore-certificate-errors"):
        options.add_argument(argument)
    # The console, where the Content-Security-Policy reports what it blocked.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
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


def fill_form(browser, live_server, tmp_path, key: str, picture_bytes: bytes | None = None) -> None:
    browser.get(f"{live_server.url}/")
    # The controls' limits and defaults arrive from /openapi.json.
    WebDriverWait(browser, 30).until(lambda _: element(browser, "generate-form").get_attribute("data-fields"))
    picture = tmp_path / "drawing.png"
    picture.write_bytes(picture_bytes or png_bytes())
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
    # In the words of the page, where a person typed a key into a field: no header names.
    assert "The API key is wrong" in element(browser, "error").text
    assert "x-api-key" not in element(browser, "error").text
    assert not element(browser, "download").is_displayed()


def test_the_page_says_the_server_runs_random_weights(browser, live_server, tmp_path):
    fill_form(browser, live_server, tmp_path, API_KEY)
    WebDriverWait(browser, 30).until(lambda _: element(browser, "model-note").is_displayed())
    assert "random weights" in element(browser, "model-note").text
    assert "SD_MODEL=tiny" in element(browser, "model-note").text


def set_range(browser, element_id: str, value: int) -> None:
    """Drag a slider to `value`, as the browser reports it (an input event)."""
    browser.execute_script(
        "const slider = document.getElementById(arguments[0]); slider.value = arguments[1];"
        "slider.dispatchEvent(new Event('input'));",
        element_id, value,
    )


def bright_pixels(browser, element_id: str) -> int:
    """How many pixels of a shown picture are bright: for an edge map, how much edge it has."""
    return browser.execute_script(
        "const image = document.getElementById(arguments[0]); const canvas = document.createElement('canvas');"
        "canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;"
        "const context = canvas.getContext('2d'); context.drawImage(image, 0, 0);"
        "const data = context.getImageData(0, 0, canvas.width, canvas.height).data; let count = 0;"
        "for (let i = 0; i < data.length; i += 4) if (data[i] > 127) count++; return count;",
        element_id,
    )


def run_and_wait(browser) -> str:
    """Generate; the seed shown with the result."""
    element(browser, "submit").click()
    WebDriverWait(browser, 90).until(lambda _: element(browser, "download").is_displayed())
    return element(browser, "result-seed").text


def text_of_result(browser, live_server) -> dict[str, str]:
    """The text chunks the server wrote into the picture the page shows (recipe, parameters), fetched by its job id."""
    job_id = element(browser, "download").get_attribute("download").removesuffix(".png")
    response = requests.get(
        f"{live_server.url}/jobs/{job_id}/result", headers={"x-api-key": API_KEY}, verify=str(live_server.cert),
        timeout=30,
    )
    return Image.open(io.BytesIO(response.content)).text


def recipe_of_result(browser, live_server) -> dict:
    return json.loads(text_of_result(browser, live_server)["recipe"])


def test_the_advanced_controls_take_their_limits_from_the_api_and_are_honoured(browser, live_server, tmp_path):
    fill_form(browser, live_server, tmp_path, API_KEY)
    assert element(browser, "advanced").get_attribute("open") is None
    assert not element(browser, "steps").is_displayed()
    element(browser, "advanced").find_element(By.TAG_NAME, "summary").click()
    for control in ("seed", "reuse-seed", "steps", "guidance-scale", "resolution", "scheduler", "refine-strength",
                    "low-threshold", "high-threshold", "progress-gif"):
        assert element(browser, control).is_displayed(), control
    # From the server's settings (tests/conftest.py: DEFAULT_STEPS=4, DEFAULT_RESOLUTION=64), not the page.
    steps, resolution = element(browser, "steps"), element(browser, "resolution")
    assert (steps.get_attribute("value"), steps.get_attribute("min"), steps.get_attribute("max")) == ("4", "1", "100")
    assert (resolution.get_attribute("value"), resolution.get_attribute("step")) == ("64", "8")
    sampler = Select(element(browser, "scheduler"))
    assert [option.text for option in sampler.options] == list(SCHEDULERS)
    assert sampler.first_selected_option.text == "unipc"

    element(browser, "seed").send_keys("1234")
    steps.clear()
    steps.send_keys("3")
    sampler.select_by_visible_text("euler")
    assert run_and_wait(browser) == "(seed 1234)"
    recipe = recipe_of_result(browser, live_server)
    assert (recipe["seed"], recipe["steps"], recipe["scheduler"]) == (1234, 3, "euler")

    element(browser, "seed").clear()
    shown = run_and_wait(browser)
    random_seed = int(shown.removeprefix("(seed ").removesuffix(")"))
    assert recipe_of_result(browser, live_server)["seed"] == random_seed
    element(browser, "reuse-seed").click()
    assert element(browser, "seed").get_attribute("value") == str(random_seed)


def test_the_lora_picker_lists_the_servers_loras_and_sends_only_the_checked_one_with_its_weight(
    browser, lora_server, tmp_path
):
    # No key saved for this server, so the list loads once, on the typed key's change event, and stays.
    browser.get(f"{lora_server.url}/")
    browser.execute_script("localStorage.clear();")
    fill_form(browser, lora_server, tmp_path, API_KEY)
    WebDriverWait(browser, 30).until(lambda _: element(browser, "generate-form").get_attribute("data-loras"))
    element(browser, "advanced").find_element(By.TAG_NAME, "summary").click()
    rows = {row.text.strip(): row for row in element(browser, "lora-list").find_elements(By.TAG_NAME, "label")}
    assert list(rows) == ["ink", "paper"] and not element(browser, "lora-note").is_displayed()

    rows["ink"].find_element(By.CSS_SELECTOR, "[data-lora]").click()
    for name, weight in (("ink", "0.5"), ("paper", "2")):  # paper's weight changed, but paper left unchecked
        weight_input = rows[name].find_element(By.CSS_SELECTOR, "input[type=number]")
        weight_input.clear()
        weight_input.send_keys(weight)
    run_and_wait(browser)
    text = text_of_result(browser, lora_server)
    assert json.loads(text["recipe"])["loras"] == "ink:0.5"
    assert text["parameters"].splitlines()[0] == "a lighthouse on a cliff <lora:ink:0.5>"
    assert "paper" not in text["parameters"]


def soft_drawing() -> bytes:
    """A sharp rectangle and a faint ellipse: only low Canny thresholds find the ellipse's edge."""
    image = drawing()
    ImageDraw.Draw(image).ellipse((70, 40, 150, 110), fill=(232, 232, 232))
    return encode(image)


def test_canny_thresholds_redraw_the_edge_map_and_bad_ones_show_the_servers_message(browser, live_server, tmp_path):
    fill_form(browser, live_server, tmp_path, API_KEY, soft_drawing())
    WebDriverWait(browser, 30).until(lambda _: loaded(browser, "edges"))
    element(browser, "advanced").find_element(By.TAG_NAME, "summary").click()
    first_src, first_edges = element(browser, "edges").get_attribute("src"), bright_pixels(browser, "edges")

    set_range(browser, "high-threshold", 20)
    set_range(browser, "low-threshold", 5)
    assert element(browser, "low-threshold-value").text == "5"
    WebDriverWait(browser, 30).until(
        lambda _: element(browser, "edges").get_attribute("src") != first_src and loaded(browser, "edges")
    )
    assert bright_pixels(browser, "edges") > first_edges

    set_range(browser, "low-threshold", 250)
    WebDriverWait(browser, 30).until(lambda _: element(browser, "error").is_displayed())
    assert "low_threshold (250) must be below high_threshold (20)" in element(browser, "error").text
    set_range(browser, "low-threshold", 10)
    WebDriverWait(browser, 30).until(lambda _: not element(browser, "error").is_displayed())


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


def test_the_content_security_policy_blocks_nothing_the_pages_use(browser, live_server, tmp_path):
    browser.get_log("browser")  # what earlier tests left
    fill_form(browser, live_server, tmp_path, API_KEY)
    element(browser, "submit").click()
    WebDriverWait(browser, 90).until(lambda _: element(browser, "download").is_displayed())
    browser.get(f"{live_server.url}/docs")
    wait_for_css(browser, ".swagger-ui .info .title")
    assert try_it_out(browser, "operations-default-get_info") in ("200", "401")  # 401 without a saved key
    console = [entry["message"] for entry in browser.get_log("browser")]
    assert not [message for message in console if "Content Security Policy" in message], console
