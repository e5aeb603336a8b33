"""`genesis quickstart` end to end (tiny data, 3 steps, in-process) and the checkpoint export."""

from __future__ import annotations

import json

import pytest
import torch
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)

from training import quickstart
from training.checkpoint import CheckpointError, load_model_weights
from training.export import ExportError, export_checkpoint


@pytest.fixture(scope="module")
def qs_run(tmp_path_factory, embedded_data):  # noqa: F811
    root = tmp_path_factory.mktemp("qs")
    mp = pytest.MonkeyPatch()
    # The embedded corpus takes a minute to build; the tiny mixture goes through the same path.
    mp.setattr(quickstart, "ensure_embedded_data", lambda _root, _vocab: embedded_data)
    try:
        rc = quickstart.cli_main(["--output-dir", str(root), "--max-steps", "3", "--max-new-tokens", "8",
                                  "--no-progress"])
    finally:
        mp.undo()
    assert rc == 0
    return root


def test_quickstart_trains_exports_and_samples(qs_run, capsys):
    records = [json.loads(x) for x in (qs_run / "run" / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in records if r.get("event") == "checkpoint"]
    assert saves and saves[-1]["step"] == 3  # the final save, recorded
    records = [r for r in records if "event" not in r]  # the training steps
    assert records[-1]["step"] == 3
    val = records[-1]["val_loss"]  # per source with held-out text, at the last step
    assert val and set(val) <= {"python-docs", "python-code"} and all(v > 0 for v in val.values())
    assert set(records[-1]["tokens_by_source"]) == {"python-docs", "python-code"}
    assert set(records[-1]["val_bigram"]) == set(val)  # the baselines beside every validation loss
    lines = quickstart.versus_counting(qs_run / "run" / "metrics.jsonl")  # what the quickstart prints
    assert len(lines) == len(val) and all(" vs bigram " in x for x in lines)
    model_dir = qs_run / "model" / "step-00000003"
    names = {p.name for p in model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    card = (model_dir / "README.md").read_text()
    assert "| step | 3 |" in card and "embedded.yaml" in card and "step-00000003" in card


def test_export_matches_the_checkpoint_weights(qs_run):
    from transformers import AutoModelForCausalLM

    from genesis_hf import GenesisConfig, GenesisForCausalLM

    ckpt = qs_run / "run" / "checkpoints" / "step-00000003"
    exported = AutoModelForCausalLM.from_pretrained(qs_run / "model" / "step-00000003", dtype=torch.float32)
    meta = json.loads((ckpt / "meta.json").read_text())
    ref = GenesisForCausalLM(GenesisConfig.from_dict(meta["model_config"]))
    load_model_weights(ckpt, ref)
    ref_sd = ref.state_dict()
    for name, value in exported.state_dict().items():
        assert torch.equal(value, ref_sd[name].to(torch.bfloat16).float()), name  # saved in bf16


def test_export_refuses_bad_inputs(qs_run, tmp_path):
    ckpt = qs_run / "run" / "checkpoints" / "step-00000003"
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(ckpt, qs_run / "model" / "step-00000003")
    with pytest.raises(CheckpointError):
        export_checkpoint(tmp_path, tmp_path / "out")  # not a checkpoint
    with pytest.raises(ExportError, match="does not exist here"):
        export_checkpoint(ckpt, tmp_path / "out2", tokenizer_dir=tmp_path / "missing")
    assert not (tmp_path / "out2").exists()


def test_quickstart_command_on_a_fresh_folder(tmp_path):
    """The README line, for real: embedded corpus, tokenizer, data, training, export, samples, alignment."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "genesis_cli", "quickstart", "--output-dir", str(tmp_path),
                          "--max-steps", "5", "--no-progress"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "[4/5] samples" in res.stdout and (tmp_path / "model" / "step-00000005" / "model.safetensors").exists()
    assert "[5/5] aligning" in res.stdout
    cycle = tmp_path / "align" / "step-00000005"
    assert (cycle / "lineage.json").is_file() and (cycle / "dpo" / "model.safetensors").is_file()
