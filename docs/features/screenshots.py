"""Screenshots of a `saeens features` dashboard in headless Chromium (Debian's chromium and
chromium-driver, plus selenium), for the README:

    python docs/features/screenshots.py DASHBOARD_DIR RUN FEATURE_ID [FEATURE_ID ...] --out docs/features

writes RUN_index.png (the feature table) and RUN_f<ID>.png (a feature page) for each id.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--hide-scrollbars", "--window-size=1200,900")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dashboard")
    ap.add_argument("run")
    ap.add_argument("features", nargs="+", type=int)
    ap.add_argument("--out", default="docs/features")
    args = ap.parse_args()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ARGS:
        opts.add_argument(a)
    profile = tempfile.mkdtemp()
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    run = Path(args.dashboard).resolve() / args.run
    out = Path(args.out)
    try:
        driver.get((run / "index.html").as_uri())
        driver.save_screenshot(str(out / f"{args.run}_index.png"))
        for f in args.features:
            driver.get((run / "features" / f"f{f}.html").as_uri())
            driver.save_screenshot(str(out / f"{args.run}_f{f}.png"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
