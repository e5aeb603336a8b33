"""Opening many sources at once is safe: the 60B recipe's 13 schemas prepare 10 of 10 times."""

from __future__ import annotations

import threading

import yaml
from _data_fixtures import FIXTURES, embedded  # noqa: F401

from training.data.prepare import prepare


def _thirteen_sources(tmp_path):
    raw = yaml.safe_load((FIXTURES / "mixture.yaml").read_text())
    raw["sources"] = [s for s in raw["sources"] if s["name"] != "plain-txt"]
    for s in raw["sources"]:
        s["data_files"] = str(FIXTURES / s["data_files"])
    assert len(raw["sources"]) == 13
    path = tmp_path / "thirteen.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_thirteen_sources_prepare_ten_of_ten_times(embedded, tmp_path):  # noqa: F811
    mix = _thirteen_sources(tmp_path)
    manifests = [prepare(mix, embedded[0], tmp_path / f"d{i}", show_progress=False, num_proc=2)
                 for i in range(10)]  # fmt: skip
    shas = [{n: [s["sha256"] for s in e["shards"]] for n, e in m["sources"].items()} for m in manifests]
    assert all(s == shas[0] for s in shas) and len(shas[0]) == 13


def test_load_dataset_from_threads_does_not_race(tmp_path, monkeypatch):
    """The root cause, made deterministic: tqdm's `ensure_lock` reads the class lock, creates one
    and deletes it on exit when there was none; a pause inside `get_lock` lets every thread find
    none, so on the unfixed code the second deletion raises AttributeError every time."""
    import time

    import tqdm as tqdm_pkg
    from datasets.utils.tqdm import tqdm as hf_tqdm
    from tqdm.auto import tqdm as auto_tqdm

    from training.data.mixture import load_mixture, open_records

    for cls in (tqdm_pkg.tqdm, auto_tqdm, hf_tqdm):  # as in a fresh process: no bar made yet
        monkeypatch.delattr(cls, "_lock", raising=False)
    real_get_lock = tqdm_pkg.tqdm.get_lock.__func__

    def slow_get_lock(cls):
        time.sleep(0.05)
        return real_get_lock(cls)

    monkeypatch.setattr(hf_tqdm, "get_lock", classmethod(slow_get_lock))
    mix = load_mixture(_thirteen_sources(tmp_path))
    errors: list[BaseException] = []

    def open_one(spec):
        try:
            next(iter(open_records(spec, tmp_path)))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(s,)) for s in mix.sources[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
