"""`genesis eval --lm-eval`: lm-evaluation-harness on an export with local task files only."""

from __future__ import annotations

import json

import pytest
from _inspect_fixtures import checkpoint, embedded_data, inspect_export, inspect_run  # noqa: F401  (fixtures)

from training.inspection import InspectError
from training.inspection.evaluate import cli_main as eval_main
from training.inspection.lm_eval_tasks import find_local_tasks, run_lm_eval, write_multiple_choice_task

MC = [{"query": "In Python, the keyword that defines a function is", "choices": [" def", " banana"], "gold": 0},
      {"query": "import os\nprint(os.", "choices": ["path)", "zebra)"], "gold": 0},
      {"query": "The Python statement that leaves a loop early is", "choices": [" break", " giraffe"], "gold": 0}]


def test_unknown_task_is_named_with_the_folders_searched(inspect_export, tmp_path, capsys):  # noqa: F811
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    write_multiple_choice_task(tmp_path / "mc.jsonl", tmp_path / "tasks", "genesis_mc")
    assert set(find_local_tasks([tmp_path / "tasks"])) == {"genesis_mc"}
    with pytest.raises(InspectError, match=rf"unknown task\(s\) hellaswag: .*searched {tmp_path / 'tasks'}; "
                                           r"found genesis_mc"):
        run_lm_eval(inspect_export, ["genesis_mc", "hellaswag"], [tmp_path / "tasks"])
    assert eval_main([str(inspect_export), "--lm-eval", "nope", "--lm-eval-include", str(tmp_path / "tasks")]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) nope" in err and str(tmp_path / "tasks") in err
    with pytest.raises(InspectError, match="exported model folder"):
        run_lm_eval(tmp_path, ["genesis_mc"], [tmp_path / "tasks"])


@pytest.fixture(scope="module")
def quickstart_model(tmp_path_factory):
    """The real quickstart (embedded corpus) with a short pretraining, exported."""
    from training import quickstart

    root = tmp_path_factory.mktemp("qs-lm-eval")
    assert quickstart.cli_main(["--output-dir", str(root), "--max-steps", "40", "--no-progress", "--no-align",
                                "--max-new-tokens", "4"]) == 0
    return next((root / "model").iterdir()), root / "embedded" / "data"


@pytest.mark.slow
def test_lm_eval_multiple_choice_and_rolling_loglikelihood_on_the_quickstart_model(quickstart_model, tmp_path):
    pytest.importorskip("lm_eval")
    model, data = quickstart_model
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    write_multiple_choice_task(tmp_path / "mc.jsonl", tmp_path / "tasks", "genesis_mc")
    out = tmp_path / "res.json"
    assert eval_main([str(model), "--data", str(data), "--lm-eval", "genesis_mc,genesis_val_python_docs",
                      "--lm-eval-include", str(tmp_path / "tasks"), "--lm-eval-limit", "5", "--device", "cpu",
                      "--json", str(out)]) == 0
    rows = {(r["task"], r["metric"]): r["value"] for r in json.loads(out.read_text())}
    assert 0.0 <= rows[("genesis_mc", "acc")] <= 1.0
    assert 0.5 < rows[("genesis_val_python_docs", "bits_per_byte")] < 8.0  # a trained model, not uniform (~12 bits)
