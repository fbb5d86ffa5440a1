"""The page at / in a real browser (Debian's chromium and chromium-driver, driven by selenium): the form
starts from the server's settings, Chinese text is drawn with real glyphs (a CJK font such as Debian's
fonts-wqy-microhei installed), type a sentence with [MASK], submit, and the streamed answer appears
highlighted in the text."""

import os
import shutil
import tempfile

import httpx
import pytest
from test_finetune import micro_model, micro_weights_model  # noqa: F401  (fixtures)
from test_serving import Served

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium")


# True when `text` drawn in element `id`'s font gives each character its own glyph: a character the font
# lacks is drawn as the same box as a private-use character (U+E000) that no font has.
SHOWS_GLYPHS = """
const font = getComputedStyle(document.getElementById(arguments[0])).fontFamily;
const drawn = (character) => {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 48;
  const context = canvas.getContext("2d");
  context.font = "40px " + font;
  context.fillText(character, 2, 40);
  return context.getImageData(0, 0, 48, 48).data.join(",");
};
const box = drawn("\\uE000"), seen = new Set();
for (const character of arguments[1]) {
  const pixels = drawn(character);
  if (pixels === box || seen.has(pixels)) return false;
  seen.add(pixels);
}
return true;
"""


@pytest.fixture(scope="module")
def browser():
    if not (CHROMEDRIVER and CHROMIUM):
        if os.environ.get("CI", "").lower() == "true":
            raise FileNotFoundError("chromium and chromedriver are required when CI=true (.ci/run installs them with apt)")
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver fonts-wqy-microhei)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="glm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_the_page_streams_the_answer_into_the_blank(browser, micro_weights_model):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    served = Served(micro_weights_model)
    try:
        browser.get(served.url + "/")
        # The form starts from what the server serves (test_serving.DEFAULTS: beam search, 2 beams, 12 tokens).
        assert Select(browser.find_element(By.ID, "strategy")).first_selected_option.get_attribute("value") == "beam_search"
        assert [browser.find_element(By.ID, field).get_attribute("value") for field in ("num_beams", "max_tokens")] == ["2", "12"]
        assert browser.execute_script(SHOWS_GLYPHS, "answer", "裙子很好看")  # not the boxes of a missing font
        text = browser.find_element(By.ID, "text")
        text.clear()
        text.send_keys("这款[MASK]的裙子很好看。")
        Select(browser.find_element(By.ID, "strategy")).select_by_value("greedy_search")
        for field, value in (("max_tokens", "8"), ("min_tgt_length", "4")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "submit").click()
        answer = browser.find_element(By.ID, "answer")
        WebDriverWait(browser, 30).until(lambda _: answer.get_attribute("data-done") == "true")
        mark = answer.find_element(By.TAG_NAME, "mark")
        expected = httpx.post(served.url + "/fill", json={"text": "这款[MASK]的裙子很好看。", "max_tokens": 8, "min_tgt_length": 4,
                              "decode_strategy": "greedy_search", "no_repeat_ngram_size": 3}, timeout=60).json()  # fmt: skip
        assert mark.text and mark.text == expected["answers"][0].strip()
        assert answer.text == expected["filled"].strip()
        assert browser.find_element(By.ID, "status").text == "done"
    finally:
        served.stop()
