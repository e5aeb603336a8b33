"""Headless Chromium for the browser tests (Debian's chromium + chromium-driver, driven by selenium).

    driver = headless_chromium(tmp_path)   # skips the test, saying why, when either is missing
    try: driver.get(url) ... finally: driver.quit()
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def require_chromium():
    """selenium's webdriver module, or skip the test naming what is missing."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    return pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")


def headless_chromium(tmp_path: Path):
    webdriver = require_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
