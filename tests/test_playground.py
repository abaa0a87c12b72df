"""The playground page at / in headless Chromium: type a prompt, stream, check every token.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the Python package
``selenium``; without them the test is skipped (and says why).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import specdec
from serving_support import make_pair, run_server
from specdec.drafters.draft_model import DraftModelDrafter
from specdec.serving import ServerConfig, create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if os.environ.get("CI") and not (CHROMIUM and CHROMEDRIVER):  # .ci/run installs them: a miss is a failure
    raise RuntimeError("CI needs Debian's chromium and chromium-driver for the playground test")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs the chromium and chromium-driver packages"
)

PROMPT = "the draft model"
MAX_TOKENS = 30
KINDS = {"accepted", "recovered", "bonus", "target"}


@pytest.fixture
def browser(tmp_path: Path):  # type: ignore[no-untyped-def]
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_streams_and_colours_tokens(tmp_path: Path, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    target_path, draft_path = make_pair(tmp_path)
    target = specdec.load_model(target_path, dtype="float32")
    draft = specdec.load_model(draft_path, dtype="float32")
    torch.manual_seed(0)
    expected = specdec.SpeculativeGenerator(target).generate(PROMPT, max_new_tokens=MAX_TOKENS)
    config = ServerConfig("tiny", max_batch_size=2, adaptive_draft_tokens=False)
    with run_server(create_app(target, lambda: DraftModelDrafter(draft, 3), config)) as url:
        browser.get(url + "/")
        assert browser.find_element(By.ID, "model").text == "tiny"
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(PROMPT)
        max_tokens = browser.find_element(By.ID, "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys(str(MAX_TOKENS))
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "status").text in ("done", "failed"))
        assert browser.find_element(By.ID, "error").text == ""
        assert browser.find_element(By.ID, "status").text == "done"

        spans = browser.find_elements(By.CSS_SELECTOR, "#output span.tok")
        kinds = [s.get_attribute("data-kind") for s in spans]
        rendered = browser.execute_script("return document.getElementById('output').textContent")
        assert rendered == expected.text
        assert len(spans) == len(expected.token_ids)
        assert set(kinds) <= KINDS and "accepted" in kinds
        check_step_shape(kinds)
        colours = {k: s.value_of_css_property("background-color") for s, k in zip(spans, kinds, strict=True)}
        assert len(set(colours.values())) == len(colours)  # each provenance has its own colour
        assert int(browser.find_element(By.ID, "tokens").text) == len(expected.token_ids)
        assert float(browser.find_element(By.ID, "tps").text) > 0
        assert browser.find_element(By.ID, "acceptance").text.endswith("%")
        assert float(browser.find_element(By.ID, "tau").text) >= 1.0


def check_step_shape(kinds: list[str]) -> None:
    """Each verify step commits ``accepted* (recovered | bonus)``: an accepted token is followed
    by another accepted one or by the step's recovered / bonus token."""
    for i, kind in enumerate(kinds[:-1]):
        if kind == "accepted":
            assert kinds[i + 1] in ("accepted", "recovered", "bonus"), kinds
