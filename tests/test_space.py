"""`genesis playground --space`: the Space folder, the push, ZeroGPU when `spaces` exists, and the
generated app.py served from the folder over local folders standing in for the revisions, driven in
a headless Chromium like tests/test_inspect_playground.py (skipped, saying why, without chromium)."""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest
import yaml
from _browser import headless_chromium, require_chromium
from _dist import free_port
from _inspect_fixtures import checkpoint, embedded_data, inspect_export, inspect_run  # noqa: F401  (fixtures)

from training.inspection.playground import cli_main
from training.inspection.space import push_space, write_space

REPO = "genesis-test/tiny"
HERE = Path(__file__).resolve().parents[1] / "training" / "inspection"


@pytest.fixture(scope="module")
def revisions(inspect_run, inspect_export, tmp_path_factory):  # noqa: F811
    """Folders named like the Hub revisions HubSync makes, each a from_pretrained export."""
    from training.export import export

    root = tmp_path_factory.mktemp("revisions")
    export(checkpoint(inspect_run, 2), root / "step-00000002")
    shutil.copytree(inspect_export, root / "step-00000006")
    return root


def test_space_folder(tmp_path, capsys):
    dst = tmp_path / "space"
    assert cli_main(["--space", str(dst), "--repo", REPO, "--columns", "2"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["README.md", "app.py", "requirements.txt", "space_ui.py"]
    meta = yaml.safe_load((dst / "README.md").read_text().split("---")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["models"] == [REPO]
    assert meta["sdk_version"] == importlib.import_module("gradio").__version__
    assert meta["suggested_hardware"] == "zero-a10g" and meta["title"] == "Genesis playground"
    reqs = (dst / "requirements.txt").read_text().split()
    assert f"transformers=={importlib.import_module('transformers').__version__}" in reqs and "torch" in reqs
    app = (dst / "app.py").read_text()
    assert f"REPO_ID = '{REPO}'" in app and "COLUMNS = 2" in app
    # The UI is the playground's own module, travelling as a file: one source, no second copy in the repo.
    assert (dst / "space_ui.py").read_bytes() == (HERE / "space_ui.py").read_bytes()
    # Bad input: an existing folder, a repo that is not owner/name.
    assert cli_main(["--space", str(dst), "--repo", REPO]) == 2
    assert f"{dst} already exists; refusing" in capsys.readouterr().err
    assert cli_main(["--space", str(tmp_path / "new"), "--repo", "tiny"]) == 2
    assert "owner/name, got 'tiny'" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_push_space(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import CommitInfo, RepoUrl

    calls = []

    def record(name, result):
        real = inspect.signature(getattr(HfApi, name))

        def fake(self, *args, **kwargs):
            calls.append((name, dict(list(real.bind(self, *args, **kwargs).arguments.items())[1:])))
            return result
        monkeypatch.setattr(HfApi, name, fake)

    record("create_repo", RepoUrl("https://huggingface.co/spaces/me/play"))
    record("upload_folder", CommitInfo(commit_url="https://huggingface.co/spaces/me/play/commit/1", commit_message="",
                                       commit_description="", oid="1" * 40))
    folder = write_space(tmp_path / "space", REPO)
    assert push_space(folder, "me/play").endswith("/commit/1")
    assert calls == [
        ("create_repo", {"repo_id": "me/play", "repo_type": "space", "space_sdk": "gradio", "private": None,
                         "exist_ok": True}),
        ("upload_folder", {"repo_id": "me/play", "repo_type": "space", "folder_path": str(folder),
                           "allow_patterns": ["README.md", "app.py", "requirements.txt", "space_ui.py"],
                           "commit_message": "Genesis playground (genesis playground --space)"})]


def _import_app(folder: Path, monkeypatch, spaces_module=None):
    monkeypatch.syspath_prepend(str(folder))
    for name in ("app", "space_ui", "spaces"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    if spaces_module is not None:
        monkeypatch.setitem(sys.modules, "spaces", spaces_module)
    else:
        monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError
    return importlib.import_module("app")


def test_zerogpu_when_spaces_is_installed(revisions, tmp_path, monkeypatch):
    folder = write_space(tmp_path / "space", REPO)
    wrapped = []
    fake = types.ModuleType("spaces")

    def GPU(duration=60):  # noqa: N802  (the spaces package's name)
        def deco(fn):
            wrapped.append((fn.__name__, duration))
            return fn
        return deco
    fake.GPU = GPU
    app = _import_app(folder, monkeypatch, fake)
    assert app.DEVICE == "cuda" and app.spaces is fake
    app.make_app(str(revisions))
    assert wrapped == [("on_generate", 120), ("on_sweep", 120)]  # the handlers that run the models
    app = _import_app(folder, monkeypatch)  # no spaces: plain functions, CPU here
    assert app.spaces is None and app.DEVICE == "cpu" and app.gpu(len) is len


def test_hub_revisions(revisions, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import GitRefInfo, GitRefs

    from training.inspection.space_ui import HubRevisions

    hub = HubRevisions(REPO, revisions_dir=revisions, columns=2)
    assert list(hub.models) == ["step-00000002", "step-00000006"]
    choices, status = hub.add("step-00000099")
    assert status == (f"**Error:** revision 'step-00000099' does not exist in {REPO}; it has: step-00000002, "
                      "step-00000006")
    *_, (texts, labels, status) = hub.generate(["step-00000002", "step-00000006"], "def f():", 0.0, 1.0, 6, 0)
    assert labels == ["step-00000002", "step-00000006"] and all(texts) and status == "Done."
    # Against the Hub: the refs a repo that HubSync fills has, steps first (oldest first).
    refs = GitRefs(branches=[GitRefInfo(name=n, ref=f"refs/heads/{n}", target_commit="0" * 40)
                             for n in ("main", "step-00000020", "step-00000010")], converts=[], tags=[])
    monkeypatch.setattr(HfApi, "list_repo_refs", lambda self, repo_id, **kw: refs)
    assert list(HubRevisions(REPO).models) == ["step-00000010", "step-00000020", "main"]


def test_space_app_in_a_browser(revisions, tmp_path):
    require_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    folder = write_space(tmp_path / "space", REPO, columns=2)
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    # The generated app, run from its own folder as a Space runs it, with the Genesis packages made
    # unimportable: a Space has neither training/ nor genesis_hf/ (the exports carry their modeling code).
    blocked = ("import runpy, sys; sys.modules.update(training=None, genesis_hf=None); "
               f"sys.argv = ['app.py', '--revisions-dir', {str(revisions)!r}, '--port', '{port}']; "
               "runpy.run_path('app.py', run_name='__main__')")
    server = subprocess.Popen([sys.executable, "-c", blocked], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    driver = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "app.log").read_text()
                assert time.monotonic() < deadline, "the Space app did not start"
                time.sleep(0.5)
        driver = headless_chromium(tmp_path)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: "step-00000006" in d.find_element(By.CSS_SELECTOR, "#models").text)
        assert "step-00000002" in driver.find_element(By.CSS_SELECTOR, "#models").text
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        prompt.clear()
        prompt.send_keys("def main():")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "Done" in d.find_element(By.CSS_SELECTOR, "#status").text)
        outs = [driver.find_element(By.CSS_SELECTOR, f"#out-{i} textarea").get_attribute("value") for i in (0, 1)]
        assert all(outs), outs  # both revisions streamed, side by side
        labels = driver.find_element(By.CSS_SELECTOR, "#out-0").text + driver.find_element(By.CSS_SELECTOR, "#out-1").text
        assert "step-00000002" in labels and "step-00000006" in labels
        # A revision that does not exist: named, with the ones that do; the app keeps serving.
        driver.find_element(By.CSS_SELECTOR, "#add-path textarea, #add-path input").send_keys("step-00000099")
        driver.find_element(By.CSS_SELECTOR, "#add").click()
        wait.until(lambda d: "step-00000099" in d.find_element(By.CSS_SELECTOR, "#status").text)
        status = driver.find_element(By.CSS_SELECTOR, "#status").text
        assert "does not exist" in status and "it has: step-00000002, step-00000006" in status
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
        log.close()

