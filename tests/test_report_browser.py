"""The report page in a real headless Chromium: tabs switch answers, figures load, no errors.

Needs Debian's ``chromium`` and ``chromium-driver`` packages and the ``selenium`` Python
package; the tests skip with the reason when any is missing.
"""

import json
import math
import shutil
import struct
from pathlib import Path

import pytest

from alignkit.plots import plot_runs
from alignkit.report import write_report

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
INSTALL_HINT = "apt-get install -y chromium chromium-driver"
NAMES = ["Base model", "SFT", "DPO", "DPO + NLL", "SFT → DPO + NLL"]
PROMPTS = ["Do you have any favorite memories?", "Give me an itinerary for <Istanbul> & more."]


def _answer(name: str, k: int) -> str:
    # Angle brackets, ampersands and newlines check that the browser shows the text verbatim.
    return f"{name} on prompt {k}: <b>not bold</b> & co.\n  second line"


def _write_run(run_dir: Path, algo: str, nll_alpha: float) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"algo": algo, "run_name": run_dir.name,
                                                  "config": {"nll_alpha": nll_alpha}}))
    lines = [json.dumps({"step": s, "split": "train", "loss": math.exp(-s / 10) + 0.2,
                         "rewards/chosen": -0.01 * s, "rewards/rejected": -0.04 * s,
                         "rewards/margins": 0.03 * s}) for s in range(1, 31)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


@pytest.fixture(scope="module")
def report_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = [_write_run(root / "dpo", "dpo", 0.0), _write_run(root / "dpo_nll", "dpo", 1.0)]
    figures = plot_runs(runs, out_dir=root / "figures")
    configs = [{"name": name, "run_dir": None, "answers": [_answer(name, k) for k in range(len(PROMPTS))],
                "metrics": {"preference_accuracy": 0.5 + i / 10}} for i, name in enumerate(NAMES)]
    return write_report(root / "site", PROMPTS, configs, figures=figures).as_uri()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not CHROMEDRIVER.is_file() or not Path(CHROMIUM).is_file():
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER}: {INSTALL_HINT}")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1400",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(15)
    yield browser
    browser.quit()


def _panels(block):
    return block.find_elements("css selector", "[role=tabpanel]")


def test_tabs_show_one_answer_at_a_time(driver, report_url):
    driver.get(report_url)
    blocks = driver.find_elements("css selector", "section.prompt")
    assert len(blocks) == len(PROMPTS)
    for k, block in enumerate(blocks):
        prompt = block.find_element("css selector", ".prompt-text").text
        assert prompt == PROMPTS[k]
        tabs = block.find_elements("css selector", "[role=tab]")
        assert [t.text for t in tabs] == NAMES
        # Before any click the first configuration is the one shown.
        assert [p.is_displayed() for p in _panels(block)] == [True] + [False] * (len(NAMES) - 1)
        for j in [*range(1, len(NAMES)), 0]:  # ends back on the first tab: showing it again works too
            tabs[j].click()
            shown = [p.is_displayed() for p in _panels(block)]
            assert shown == [i == j for i in range(len(NAMES))], (k, j, shown)
            answer = _panels(block)[j].find_element("css selector", ".answer")
            assert answer.get_attribute("textContent") == _answer(NAMES[j], k)
            assert tabs[j].get_attribute("aria-selected") == "true"
    # A click in one prompt's tab bar leaves the other prompts alone.
    blocks[0].find_elements("css selector", "[role=tab]")[2].click()
    assert _panels(blocks[1])[0].is_displayed() and not _panels(blocks[1])[2].is_displayed()


def test_arrow_keys_move_between_tabs(driver, report_url):
    from selenium.webdriver.common.keys import Keys

    driver.get(report_url)
    block = driver.find_elements("css selector", "section.prompt")[0]
    tabs = block.find_elements("css selector", "[role=tab]")
    tabs[0].click()
    tabs[0].send_keys(Keys.ARROW_RIGHT)
    assert _panels(block)[1].is_displayed() and not _panels(block)[0].is_displayed()
    tabs[1].send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT)
    assert _panels(block)[-1].is_displayed()


def test_figures_load_and_console_is_clean(driver, report_url, tmp_path):
    driver.get_log("browser")  # drop entries from earlier tests
    driver.get(report_url)
    images = driver.find_elements("css selector", "figure img")
    assert len(images) == 5  # two runs x (loss, rewards) + the side-by-side comparison
    for image in images:
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []

    shot = tmp_path / "report.png"
    driver.execute_script("document.querySelector('#answers').scrollIntoView()")
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert width >= 800 and height >= 600
