"""The static feature browser, opened in a real headless Chromium (Debian's, driven by
Selenium with /usr/bin/chromedriver given explicitly, so nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_sae.analysis import load_inspection
from lightning_sae.analysis.browser import write_browser
from lightning_sae.analysis.results import CONTEXTS_FILENAME
from tests._tiny_inspect import D_SAE, tiny_inspection

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs them, so in CI this test must run.")
        pytest.skip(f"{reason}; .ci/run installs them and runs this test in CI.")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1100"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_inspection(tmp_path_factory.getbasetemp() / "tiny-inspect")


def test_index_lists_sorts_and_filters_the_features(browser: Any, result: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get((result / "index.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#features tbody tr")
    assert len(rows) == D_SAE  # every feature of the tiny SAE fires
    maxes = [float(r.find_elements(By.TAG_NAME, "td")[2].text) for r in rows]
    assert maxes == sorted(maxes, reverse=True)  # default order: max activation, descending
    browser.find_element(By.CSS_SELECTOR, "th[data-key=id]").click()
    first = browser.find_element(By.CSS_SELECTOR, "#features tbody tr")
    assert first.get_attribute("data-feature") == "0"
    browser.find_element(By.ID, "filter").send_keys("17")
    shown = browser.find_elements(By.CSS_SELECTOR, "#features tbody tr")
    assert "17" in [r.get_attribute("data-feature") for r in shown]
    assert len(shown) < D_SAE


def test_feature_page_highlights_the_max_token_of_its_top_context(
    browser: Any, result: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    inspection = load_inspection(result)
    feature = int(inspection.features.max_act.idxmax())
    top = inspection.top_contexts(feature).iloc[0]
    browser.get((result / "index.html").as_uri())
    browser.find_element(By.CSS_SELECTOR, f"tr[data-feature='{feature}'] a").click()
    assert browser.find_element(By.ID, "title").text == f"Feature {feature}"

    context = browser.find_element(By.CSS_SELECTOR, "#top .context")
    marked = context.find_elements(By.CSS_SELECTOR, ".tok.max")
    assert len(marked) == 1
    assert marked[0].text == top.strs[top.max_index].replace("\n", "\u21b5").strip()
    assert marked[0].value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"
    assert f"{top.value:.3g}".rstrip("0") in context.find_element(By.CLASS_NAME, "value").text
    bars = browser.find_elements(By.CSS_SELECTOR, "#histogram svg rect")
    assert bars and len({bar.get_attribute("fill") for bar in bars}) > 1  # by interval
    labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#histogram svg .label")]
    assert labels == ["activation (log scale)", "tokens"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#histogram svg .tick")) >= 4
    swatches = browser.find_elements(By.CSS_SELECTOR, "#intervals .swatch")
    assert {s.value_of_css_property("background-color") for s in swatches} > set()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#neighbours a")) == 8
    assert "encoder" in browser.find_element(By.ID, "logits").text  # MiniLM: the note

    # A look for people: LIGHTNING_SAE_SCREENSHOTS keeps the picture.
    shot = tmp_path / f"feature_{feature}.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
    if keep := os.environ.get("LIGHTNING_SAE_SCREENSHOTS"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)


def page_data(page: Path) -> dict[str, Any]:
    text = page.read_text()
    start = text.index('id="feature-data">') + len('id="feature-data">')
    return json.loads(text[start : text.index("</script>", start)])


def test_histogram_bins_take_their_intervals_colour_and_repeats_show_once(
    result: Path, tmp_path: Path
) -> None:
    """Each histogram bin is coloured as the interval whose samples hold its values; a top
    context whose tokens repeat an earlier one is shown once, counted."""
    folder = tmp_path / "inspection"
    shutil.copytree(result, folder)
    contexts = pq.read_table(folder / CONTEXTS_FILENAME).to_pandas()
    feature = int(contexts.feature.iloc[0])
    top = contexts[(contexts.feature == feature) & (contexts.kind == "top")]
    copy = top.iloc[[0]].assign(window=-5, rank=len(top))  # the same text from another window
    rows = pd.concat([contexts.iloc[: top.index[-1] + 1], copy, contexts.iloc[top.index[-1] + 1 :]])
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), folder / CONTEXTS_FILENAME)
    write_browser(folder)

    pad = len(str(D_SAE - 1))
    data = page_data(folder / "features" / f"{str(feature).zfill(pad)}.html")
    assert len(data["top"]) == len(top) and data["top"][0]["repeats"] == 2
    hist, colours = data["hist"], {g["colour"] for g in data["intervals"]}
    assert len(hist["colours"]) == len(hist["counts"]) == len(hist["interval"]) > 0
    for i, (k, colour) in enumerate(zip(hist["interval"], hist["colours"], strict=True)):
        group = next(g for g in data["intervals"] if g["colour"] == colour)
        centre = (hist["edges"][i] * hist["edges"][i + 1]) ** 0.5
        assert group["lo"] < centre <= group["hi"] or (
            k == len(colours) - 1 and centre > group["hi"]
        )
    assert len(set(hist["colours"])) > 1  # the tiny SAE's features span several intervals
