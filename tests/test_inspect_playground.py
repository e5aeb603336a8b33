"""`genesis playground`: generation logic, bad paths, and the real app in a headless Chromium.

The browser test needs Debian's chromium and chromium-driver (CI: `apt-get install -y chromium
chromium-driver`) and selenium from PyPI; it skips, saying which is missing, without them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _browser import headless_chromium, require_chromium
from _dist import free_port
from _inspect_fixtures import checkpoint, embedded_data, inspect_export, inspect_run  # noqa: F401  (fixtures)

from training.inspection.models import expand_paths, load_model
from training.inspection.playground import FIXED_PROMPTS, Playground, generate_stream


def test_greedy_stream_equals_generate(inspect_export):  # noqa: F811
    model, tok, _ = load_model(inspect_export)
    prompt = "def add(a, b):"
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    want = tok.decode(ref[0, ids.shape[1]:])
    chunks = list(generate_stream(model, tok, prompt, temperature=0, max_new_tokens=12))
    assert chunks[-1] == want and len(chunks) > 1  # streamed in pieces, same text as generate
    a = list(generate_stream(model, tok, prompt, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7))[-1]
    b = list(generate_stream(model, tok, prompt, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7))[-1]
    assert a == b  # the seed makes sampling repeatable


def test_playground_models_and_bad_paths(inspect_run, inspect_export, tmp_path):  # noqa: F811
    assert expand_paths([inspect_run]) == [checkpoint(inspect_run, s) for s in (2, 4, 6)]
    (tmp_path / "junk").mkdir()
    pg = Playground([inspect_run, tmp_path / "junk", inspect_export], columns=2)
    assert list(pg.models) == ["tiny-run/step-00000002", "tiny-run/step-00000004", "tiny-run/step-00000006",
                               "tiny-6"]
    assert "neither an exported model" in pg.notes[0] and str(tmp_path / "junk") in pg.notes[0]
    choices, status = pg.add(str(tmp_path / "missing"))
    assert status.startswith("**Error:**") and str(tmp_path / "missing") in status and len(choices) == 4
    *_, (texts, labels, status) = pg.generate(["tiny-run/step-00000002", "tiny-6", "tiny-run/step-00000004"],
                                              "The", 0.0, 1.0, 5, 0)
    assert labels == ["tiny-run/step-00000002", "tiny-6"] and all(texts)
    assert status.startswith("Showing the first 2 of 3")
    headers, rows, status = pg.across_run(["tiny-run/step-00000006"], 0.0, 1.0, 4, 0)
    assert headers == ["prompt", "tiny-run/step-00000006"] and len(rows) == len(FIXED_PROMPTS)
    assert all(len(r) == 2 and r[1] for r in rows) and status == "Done."
    # Curves tab: a run plots; a broken metrics file is named in the status line, nothing raises.
    assert pg.runs == [str(inspect_run)]
    png, status = pg.plot(str(inspect_run))
    assert Path(png).stat().st_size > 10_000 and status == "Plotted tiny-run."
    broken = tmp_path / "metrics.jsonl"
    broken.write_text('{"step": 1, "loss": 2.0}\n{"step": 2,\n{"step": 3, "loss": 1.0}\n')
    png, status = pg.plot(f"{inspect_run}\n{broken}")
    assert png is None and f"**Error:** {broken}:2: broken metrics line" in status


def test_browser_generation(inspect_export, tmp_path):  # noqa: F811
    require_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from training.inspection.playground import _theme, build_app

    app = build_app([inspect_export], columns=2)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
               theme=_theme())
    driver = headless_chromium(tmp_path)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.clear()
        prompt.send_keys("def main():")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        out = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#out-0 textarea").get_attribute("value") or None)
        assert len(out) > 0
        # A bad path through the UI: the error names it, and the app keeps serving.
        add = driver.find_element(By.CSS_SELECTOR, "#add-path textarea, #add-path input")
        add.send_keys(str(tmp_path / "not-a-model"))
        driver.find_element(By.CSS_SELECTOR, "#add").click()
        wait.until(lambda d: "not-a-model" in d.find_element(By.CSS_SELECTOR, "#status").text)
        assert "no such folder" in driver.find_element(By.CSS_SELECTOR, "#status").text
        # A broken metrics file in the Curves tab: named in the page.
        broken = tmp_path / "broken" / "metrics.jsonl"
        broken.parent.mkdir()
        broken.write_text('{"step": 1, "loss": 2.0}\n{"step": 2,\n{"step": 3, "loss": 1.0}\n')
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Curves").click()
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#plot-sources textarea"))
        box.clear()
        box.send_keys(str(broken))
        driver.find_element(By.CSS_SELECTOR, "#plot").click()
        wait.until(lambda d: "broken metrics line" in d.find_element(By.CSS_SELECTOR, "#status").text)
        assert f"{broken}:2" in driver.find_element(By.CSS_SELECTOR, "#status").text
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Generate").click()
        before = driver.find_element(By.CSS_SELECTOR, "#out-0 textarea").get_attribute("value")
        prompt.clear()
        prompt.send_keys("import os")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = driver.find_element(By.CSS_SELECTOR, "#out-0 textarea").get_attribute("value")
            status = driver.find_element(By.CSS_SELECTOR, "#status").text
            if now and now != before and "Done" in status:
                break
            time.sleep(0.2)
        assert "Done" in status and now, (now, status)
    finally:
        driver.quit()
        app.close()
