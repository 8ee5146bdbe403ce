"""The web demo in a real browser: app.py's page served on localhost with the tiny merged model, driven by
headless Chromium (Debian's chromium + chromium-driver, through selenium): an example scene and an
expression in, the overlay, answer and score checked in the page; then a bad upload, whose message must be
shown in the page. The screenshot is kept as a test artefact (``$LFLLM_TEST_ARTIFACTS`` or
``runs/test_artifacts/demo_browser.png``)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

import app
from dataset.prompts import VAL_ANSWER
from model.lfllm import LFLLMForCausalLM
from training.serve.demo import Demo, load_examples
from training.serve.predict import Segmenter, parse_serve

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
EXPRESSION = "the closest yellow vehicle"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium / chromedriver not found: `apt-get install chromium chromium-driver` "
    "(bash scripts/setup_env.sh --browser does it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_merged):
    from training.serve.demo_ui import build_page, launch

    parser = app.build_parser(str(tiny_merged), str(ROOT / "examples"))
    args, serve = parse_serve(parser, ["--max_new_tokens", "4"])
    demo = Demo(Segmenter(serve), load_examples(args.examples))
    page = build_page(demo)
    url = launch(page, "127.0.0.1", _free_port(), demo.limits.max_total_bytes, block=False)
    yield demo, url
    page.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _value(driver, elem_id: str) -> str:
    field = driver.find_element("css selector", f"#{elem_id} textarea, #{elem_id} input")
    return field.get_attribute("value") or ""


def test_demo_page_segments_an_example_and_reports_bad_uploads(served, browser, tmp_path, monkeypatch):
    from selenium.webdriver.support.ui import WebDriverWait

    demo, url = served
    want = demo.run("Image2", None, EXPRESSION)  # what the page must show (greedy, deterministic)
    assert want.overlay is not None and want.answer
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    wait.until(lambda d: d.find_elements("css selector", "#expression textarea, #expression input"))
    next(
        e for e in browser.find_elements("css selector", "#example label") if e.text.strip() == "Image2"
    ).click()
    browser.find_element("css selector", "#expression textarea, #expression input").send_keys(EXPRESSION)
    browser.find_element("css selector", "#run").click()
    wait.until(lambda d: _value(d, "score") == want.score)
    overlay = wait.until(
        lambda d: next(
            (i for i in d.find_elements("css selector", "#overlay img") if i.get_property("naturalWidth")),
            None,
        )
    )
    assert _value(browser, "answer") == want.answer
    assert _value(browser, "score") == want.score
    assert overlay.get_property("naturalWidth") == want.overlay.shape[1] >= 512
    assert overlay.get_property("naturalHeight") == want.overlay.shape[0]
    for other in ("disparity", "caam"):  # the light-field side is shown too
        wait.until(
            lambda d, o=other: any(
                i.get_property("naturalWidth") for i in d.find_elements("css selector", f"#{o} img")
            )
        )
    # The tiny model is random and may answer without [SEG]; with the answer forced to hold one, the page
    # shows the mask and its score (the rest of the path is the real one).
    tok = demo.segmenter.tokenizer
    forced = torch.tensor([tok(" " + VAL_ANSWER + "</s>", add_special_tokens=False).input_ids])
    monkeypatch.setattr(LFLLMForCausalLM, "generate", lambda self, **kw: forced)
    want = demo.run("Image1", None, "the rider")
    assert want.scores is not None and "[SEG]" in want.answer
    next(
        e for e in browser.find_elements("css selector", "#example label") if e.text.strip() == "Image1"
    ).click()
    field = browser.find_element("css selector", "#expression textarea, #expression input")
    field.clear()
    field.send_keys("the rider")
    browser.find_element("css selector", "#run").click()
    wait.until(lambda d: _value(d, "score") == want.score)
    assert want.score.startswith("score 0.") and _value(browser, "answer") == want.answer
    artefacts = Path(os.environ.get("LFLLM_TEST_ARTIFACTS", ROOT / "runs" / "test_artifacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "demo_browser.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    bad = tmp_path / "holiday.png"  # an image, but no light field: no centre view 5_5.png
    bad.write_bytes((ROOT / "examples" / "Image1" / "5_5.png").read_bytes())
    browser.find_element("css selector", "#upload input[type=file]").send_keys(str(bad))
    wait.until(
        lambda d: any(
            e.is_selected() for e in d.find_elements("css selector", "#example input[value='(my upload)']")
        )
    )
    browser.find_element("css selector", "#run").click()
    message = wait.until(
        lambda d: (t := d.find_element("css selector", "#message").text) and "centre view" in t and t
    )
    assert "no centre view 5_5.png in the upload" in message and "Traceback" not in browser.page_source
