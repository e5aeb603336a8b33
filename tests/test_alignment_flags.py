"""Degenerate alignment output is flagged: in the evaluation table, the cycle's results and `genesis align compare`."""

from __future__ import annotations

import json

from alignment.cycle import compare_lineages
from alignment.evaluate import degeneracy_flags, format_table, is_repetitive


def _r(words, empty=0.0, rep=0.0, **kw):
    return {"n": 10, "hedging_rate": 0.2, "curiosity": 0.1, "hedging": 0.05, "score": 0.05, "mean_words": words,
            "empty_rate": empty, "repetition_rate": rep, **kw}


def test_repetition_detector():
    assert is_repetitive("the the the the the the the the")
    assert is_repetitive("I do not know . I do not know . I do not know . I do not know")
    assert not is_repetitive("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.")
    assert not is_repetitive("yes yes")  # too short to call a loop


def test_flags_short_repetitive_and_empty_against_the_parent_stage():
    # the collapse: SFT 11 words, DPO 2
    flags = degeneracy_flags({"base": _r(30), "sft": _r(11), "dpo": _r(2)})
    assert flags["base"] == [] and flags["sft"] == ["short: 11.0 words < 50% of base's 30.0"]
    assert flags["dpo"] == ["short: 2.0 words < 50% of sft's 11.0"]
    assert degeneracy_flags({"sft": _r(11), "dpo": _r(6)})["dpo"] == []  # 6 >= 5.5
    flags = degeneracy_flags({"sft": _r(11), "dpo": _r(10, empty=0.3, rep=0.5)})
    assert flags["dpo"] == ["repetitive: 50% of answers loop", "empty: 30% of answers"]
    table = format_table({"sft": _r(11), "dpo": _r(2)})
    assert "| sft | 10 |" in table and table.splitlines()[2].endswith("| ok |")
    assert table.splitlines()[3].endswith("| **DEGENERATE** |")
    assert "- **dpo is degenerate**: short: 2.0 words < 50% of sft's 11.0" in table
    # results from before these fields (older lineage files) still format
    old = {k: v for k, v in _r(11).items() if k not in ("empty_rate", "repetition_rate")}
    assert "| ok |" in format_table({"sft": old})


def test_compare_flags_a_collapsed_cycle(tmp_path):
    lineage = {"cycle": "c1", "parent": {"step": 600}, "constitution": {"version": 1},
               "scores": {"base": _r(20), "sft": _r(11), "dpo": _r(2)}}
    path = tmp_path / "lineage.json"
    path.write_text(json.dumps(lineage))
    rows = compare_lineages([path]).splitlines()
    assert rows[3].endswith("| sft | 20.0% | 0.100 | +0.050 | 11.0 | ok |")
    assert rows[4].endswith("| dpo | 20.0% | 0.100 | +0.050 | 2.0 | DEGENERATE: short: 2.0 words < 50% of sft's 11.0 |")
