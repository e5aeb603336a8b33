"""A checkpoint crafted by someone else cannot run code when loaded (RELIABILITY.md row 18).

DCP's own reader unpickles `.metadata` with a bare `pickle.load`; a downloaded checkpoint whose
metadata pickle names `os.system` would run it on every rank before any check of ours. The sha256
manifest does not help: it comes from the same folder. Every load path (resume, Hub resume,
export, playground, `genesis eval`) reads metadata through `SafeFileSystemReader`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from _checkpoint_fixtures import build, seed_all, train_steps

from training.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from training.checkpoint.loading import read_dcp_metadata


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model, opt, sched = build(seed=0)
    seed_all(0)
    train_steps(model, opt, sched, 1)
    root = tmp_path_factory.mktemp("crafted")
    return save_checkpoint(root, 1, model=model, optimizer=opt, scheduler=sched, train_state={"step": 1},
                           data_state={"cursor": 1}, meta={"seq_len": 16})  # fmt: skip


def _craft(src: Path, dst: Path, part: str, payload: bytes) -> Path:
    """Copy the checkpoint, replace `part/.metadata` AND its manifest entry (as an attacker would)."""
    shutil.copytree(src, dst)
    meta = dst / part / ".metadata"
    meta.write_bytes(payload)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"][f"{part}/.metadata"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return meta


def test_genuine_metadata_reads(ckpt):
    md = read_dcp_metadata(ckpt / "model")
    assert "model.embed_tokens.weight" in md.state_dict_metadata
    assert read_dcp_metadata(ckpt / "optimizer").state_dict_metadata


# "weights" is what export, the playground and `genesis eval` call; they read the model part only.
@pytest.mark.parametrize("part,how", [("model", "resume"), ("optimizer", "resume"), ("model", "weights")])
def test_metadata_that_would_run_code_is_refused(ckpt, tmp_path, part, how):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCode(marker))
    assert b"system" in payload
    path = tmp_path / "step-00000001"
    crafted = _craft(ckpt, path, part, payload)
    model, opt, sched = build(seed=1)
    with pytest.raises(CheckpointError) as err:
        if how == "resume":
            load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
        else:
            load_model_weights(path, model)
    assert str(crafted) in str(err.value) and "refused" in str(err.value)
    assert "os.system" in str(err.value) or "posix.system" in str(err.value)
    assert not marker.exists(), "the crafted pickle ran"


def test_metadata_of_another_type_is_refused(ckpt, tmp_path):
    path = tmp_path / "step-00000001"
    crafted = _craft(ckpt, path, "model", pickle.dumps({"state_dict_metadata": {}}))
    model, _, _ = build(seed=1)
    with pytest.raises(CheckpointError, match="not DCP Metadata") as err:
        load_model_weights(path, model)
    assert str(crafted) in str(err.value)
