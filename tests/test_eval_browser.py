"""The Evaluate tab in a real browser (Playwright on Debian Chromium) on the trained tiny demo run:
pick the run, two checkpoints and the base, a data file and a row limit; Evaluate shows progress
and ends with the scores; the plot draws the chosen metric over the checkpoints; the table holds
every target; two targets list the rows whose answers changed; Stop ends a long evaluation.
Screenshots go to artifacts/. Skips without /usr/bin/chromium, fails under CI=true."""

import json
import os
import re
from pathlib import Path

import pytest

from test_browser import ARGS, ARTIFACTS, CHROMIUM, _need_chromium, blur, tab, wait_for
from test_webui_handlers import TOKEN, loaded_libraries, start_app, stop_app

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    _need_chromium()
    url, proc = start_app(tmp_path_factory.mktemp("eval-app") / "app.log")
    yield url, proc
    stop_app(proc)


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1100})
        pg.set_default_timeout(60_000)
        pg.goto(app[0] + f"?token={TOKEN}")
        yield pg
        browser.close()


def choose(page, sel: str, value: str) -> None:
    """Open a dropdown and click VALUE (a multiselect keeps what was chosen before)."""
    page.locator(f"{sel} input").click()
    page.wait_for_timeout(600)
    page.locator("ul[role=listbox] li", has_text=re.compile(rf"^\W*{re.escape(value)}\s*$")).first.click()
    page.keyboard.press("Escape")
    blur(page)


def status(page) -> str:
    return page.locator("#ev-status").inner_text()


def test_evaluate_tab_scores_plots_and_lists_changed_rows(app, page, demo_run):
    sample = Path(os.environ["LORASTUDIO_HOME"]) / "cache" / "tiny-v4" / "sample_chat.jsonl"
    steps = sorted(int(p.name.split("-")[1]) for p in demo_run.glob("checkpoint-*"))
    assert len(steps) >= 2, steps
    tab(page, "Evaluate")
    page.locator("#tab-evaluate").wait_for()
    page.locator("#ev-run input").fill(str(demo_run))
    page.keyboard.press("Enter")
    wait_for(lambda: "final" in page.locator("#ev-targets").inner_text(), 30, "the run's targets offered")
    choose(page, "#ev-targets", f"checkpoint-{steps[0]}")  # final is chosen already
    page.locator("#ev-data textarea, #ev-data input").first.fill(str(sample))
    page.get_by_label("Rows (0: all)").fill("12")
    page.get_by_label("Max new tokens").fill("32")
    page.locator("#ev-btn").click()
    wait_for(lambda: "⏳" in status(page) or "done" in status(page), 60, "progress shown")
    wait_for(lambda: "done" in status(page), 240, "the evaluation to finish")
    assert "final: exact match" in status(page) and "base: exact match" in status(page)
    for target in (f"checkpoint-{steps[0]}", "final", "base"):
        found = json.loads((demo_run / "eval" / f"sample_chat__{target}.json").read_text())
        assert found["rows"] == 12
    # the table and the plot are read from those files
    wait_for(lambda: "sample_chat" in page.locator("#ev-stem input").input_value(), 30, "the results' data picked")
    table = wait_for(lambda: (t := page.locator("#ev-table").inner_text()) and f"checkpoint-{steps[0]}" in t and t,
                     30, "the table re-read after the job")  # an earlier evaluation's files may show first
    assert "base" in table and "final" in table
    lines = lambda: page.eval_on_selector_all("#ev-plot g.mark-line path", "els => els.map(e => e.getAttribute('d'))")  # noqa: E731
    assert wait_for(lambda: any(d and "L" in d for d in lines()), 30, "a line of the score over checkpoints")
    page.get_by_label("perplexity").check()
    wait_for(lambda: "perplexity" in page.locator("#ev-plot").inner_text(), 30, "the plot of perplexity")
    choose(page, "#ev-a", "base")
    choose(page, "#ev-b", "final")
    note = lambda: re.search(r"(\d+) rows answered differently by base and final",  # noqa: E731
                             page.locator("#ev-changed-note").inner_text())
    shown = wait_for(note, 30, "the changed rows counted")
    base, final = (json.loads((demo_run / "eval" / f"sample_chat__{t}.json").read_text())["answers"]
                   for t in ("base", "final"))
    differ = [b for a, b in zip(base, final) if a["answer"] != b["answer"]]
    assert int(shown.group(1)) == len(differ) > 0
    assert differ[0]["answer"] in page.locator("#ev-changed").inner_text()
    page.screenshot(path=str(ARTIFACTS / "browser_evaluate.png"), full_page=True)

    # Stop: a long evaluation (every row, every checkpoint) ends between rows, its state said
    page.get_by_label("Rows (0: all)").fill("0")
    page.locator("#ev-btn").click()
    wait_for(lambda: "target" in status(page) and "rows" in status(page), 120, "rows being scored")
    page.locator("#ev-stop-btn").click()
    wait_for(lambda: "stopped" in status(page), 60, "the evaluation stopped")
    page.screenshot(path=str(ARTIFACTS / "browser_evaluate_stopped.png"), full_page=True)
    # the evaluation ran in its child: the server never loaded torch or the tokenizers
    heavy = sorted(n for n in loaded_libraries(app[1].pid) if n.startswith(("libtorch", "libc10", "tokenizers")))
    assert heavy == [], heavy
