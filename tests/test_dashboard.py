"""The static dashboard in a real headless Chromium (Debian's chromium + chromium-driver, which
.ci/run installs): no console errors, the index lists every feature and filters / sorts them, a
feature page shows its contexts. A missing browser fails the test."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from features_helpers import make_cache, make_ensemble

from saeens import ensemble
from saeens.data.cache import ActivationCache
from saeens.data.tokens import byte_tokenizer
from saeens.features import FeaturesConfig, analyse
from saeens.features.dashboard import write_dashboard

CHROME_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through selenium and the system chromedriver (no driver download)."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("Chromium is missing: apt-get install -y chromium chromium-driver (as .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in CHROME_ARGS:
        opts.add_argument(a)
    profile = tempfile.mkdtemp(prefix="saeens-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(driver))
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("dashboard")
    acts = ActivationCache(make_cache(root / "acts", tiny_model))
    ens, other = make_ensemble("relu", J=3), make_ensemble("relu", J=3, seed=1)
    rec = analyse(ens, {"name": "bagging", "method": "bagging"}, acts, [("seed1", ensemble.decoder(other))],
                  FeaturesConfig(split="all", top_n=4), tiny_model, byte_tokenizer(), progress=False)
    write_dashboard(root / "out", [rec])
    return root / "out", rec


def errors(browser):
    return [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def test_dashboard_in_headless_chromium(browser, dashboard, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out, rec = dashboard
    browser.get((out / "index.html").as_uri())
    assert browser.find_element(By.LINK_TEXT, "bagging")
    browser.get((out / "bagging" / "index.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#features tbody tr")
    assert [r.find_element(By.TAG_NAME, "a").text for r in rows] == [f"m{f['member']}.{f['latent']}" for f in rec["features"]]
    assert len(rows) == rec["n_features"] and browser.find_element(By.ID, "shown").text == str(len(rows))

    Select(browser.find_element(By.ID, "member")).select_by_value("1")
    visible = [r for r in browser.find_elements(By.CSS_SELECTOR, "#features tbody tr") if r.is_displayed()]
    assert len(visible) == sum(f["member"] == 1 for f in rec["features"])
    Select(browser.find_element(By.ID, "member")).select_by_value("")
    Select(browser.find_element(By.ID, "mincons")).select_by_value("3")
    visible = [r for r in browser.find_elements(By.CSS_SELECTOR, "#features tbody tr") if r.is_displayed()]
    assert len(visible) == sum(f["consensus"] >= 3 for f in rec["features"]) > 0
    Select(browser.find_element(By.ID, "mincons")).select_by_value("1")
    browser.find_element(By.CSS_SELECTOR, 'th[data-key="frequency"]').click()  # the first click sorts descending
    first = browser.find_elements(By.CSS_SELECTOR, "#features tbody tr")[0].get_attribute("data-frequency")
    assert float(first) == pytest.approx(max(f["frequency"] for f in rec["features"]), rel=1e-5)
    browser.save_screenshot(str(tmp_path / "index.png"))

    feat = max(rec["features"], key=lambda f: len(f["contexts"]))
    browser.find_element(By.LINK_TEXT, f"m{feat['member']}.{feat['latent']}").click()
    ctxs = browser.find_elements(By.CSS_SELECTOR, "#contexts .ctx")
    assert len(ctxs) == len(feat["contexts"]) > 0
    for el, c in zip(ctxs, feat["contexts"]):
        assert el.text == "".join(c["tokens"]).replace("\n", "\u21b5")
        assert el.find_element(By.CSS_SELECTOR, ".focus").text == c["tokens"][c["focus"]].replace("\n", "\u21b5")
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.hist rect")) > 0
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.logits.promoted tr")) == len(feat["logits"]["promoted"])
    browser.save_screenshot(str(tmp_path / "feature.png"))
    assert (tmp_path / "feature.png").stat().st_size > 10_000
    assert errors(browser) == []
