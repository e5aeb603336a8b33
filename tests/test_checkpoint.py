"""Checkpoints in one process: exact round trip, refusals naming the part, atomicity, keep-last, disk
full, resume compatibility. RELIABILITY.md rows 2, 4, 7 (the check), 10 and 11; the multi-process
rows are in test_checkpoint_distributed.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _checkpoint_fixtures import assert_same, build, seed_all, snapshot, train_steps

from training.checkpoint import (
    CheckpointError,
    check_resume_compatible,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    read_meta,
    resolve_resume,
    save_checkpoint,
)
from training.checkpoint.__main__ import main as ckpt_cli
from training.checkpoint.layout import committed, leftovers

REPO = Path(__file__).resolve().parents[1]
META = {
    "world_size": 1,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "seq_len": 16,
    "tokenizer_fingerprint": "abc123",
}


def _save(root, step, model, opt, sched, **kw):
    args = {"train_state": {"step": step, "tokens": step * 128}, "data_state": {"cursor": step}, "meta": META}
    return save_checkpoint(root, step, model=model, optimizer=opt, scheduler=sched, **(args | kw))


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    """A committed step-3 checkpoint of a tiny Genesis model (copy it before damaging it)."""
    root = tmp_path_factory.mktemp("base")
    model, opt, sched = build(seed=0)
    seed_all(1)
    train_steps(model, opt, sched, 3)
    return _save(root, 3, model, opt, sched)


@pytest.fixture
def ckpt_copy(base_ckpt, tmp_path) -> Path:
    dst = tmp_path / "ckpts" / base_ckpt.name
    shutil.copytree(base_ckpt, dst)
    return dst


def _load(path, seed=9, genesis=True, **kw):
    model, opt, sched = build(seed=seed, genesis=genesis)
    return load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, **kw), (model, opt, sched)


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(4).tolist()


def test_round_trip_is_exact(tmp_path):
    model, opt, sched = build(seed=0)
    seed_all(11)
    train_steps(model, opt, sched, 3)
    path = _save(tmp_path, 3, model, opt, sched, data_state={"cursor": 42, "remainder": [1, 2]})
    saved = snapshot(model, opt)
    draws, losses = _draws(), train_steps(model, opt, sched, 3)
    final, sched_state = snapshot(model, opt), sched.state_dict()

    seed_all(12345)  # the resumed process starts with other RNG and other weights
    out, (m2, o2, s2) = _load(path)
    assert_same(saved, snapshot(m2, o2))
    assert _draws() == draws  # python, numpy and torch generators all restored
    assert train_steps(m2, o2, s2, 3) == losses  # batches and dropout come from the restored RNG
    assert_same(final, snapshot(m2, o2))
    assert s2.state_dict() == sched_state
    assert out["train_state"] == {"step": 3, "tokens": 384}
    assert out["data_state"] == {"cursor": 42, "remainder": [1, 2]}
    assert out["meta"]["seq_len"] == 16 and out["meta"]["world_size"] == 1 and "torch" in out["meta"]["versions"]
    audit = out["audit"]
    assert audit["step"] == 3 and audit["optimizer"] == "restored" and audit["verify"] == "sha256"
    assert audit["optimizer_groups"][0]["step_min"] == audit["optimizer_groups"][0]["step_max"] == 3.0
    assert audit["bytes_hashed_by_this_rank"] > 0


def test_accelerate_prepared_objects(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator()
    try:
        model, opt, sched = acc.prepare(*build(seed=0))
        seed_all(2)
        train_steps(model, opt, sched, 2)
        path = _save(tmp_path, 2, model, opt, sched)
        m2, o2, s2 = acc.prepare(*build(seed=4))
        out = load_checkpoint(path, model=m2, optimizer=o2, scheduler=s2)
    finally:  # the state is a process-wide singleton: leave none behind for other tests
        AcceleratorState._reset_state(reset_partial_state=True)
    assert_same(snapshot(model, opt.optimizer), snapshot(m2, o2.optimizer))
    assert s2.scheduler.last_epoch == sched.scheduler.last_epoch == 2
    assert out["audit"]["optimizer_groups"][0]["step_max"] == 2.0


def test_activation_checkpointed_model_saves_plain_names(tmp_path):
    """The GPU recipe wraps decoder layers for activation checkpointing; the checkpoint must still use
    plain HF names so export (and a run without the wrapper) can load it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    model, opt, sched = build(seed=0)
    layer_cls = type(model.model.layers[0])
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer_cls))
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    seed_all(0)
    train_steps(model, opt, sched, 1)
    path = _save(tmp_path, 1, model, opt, sched)
    keys = FileSystemReader(path / "model").read_metadata().state_dict_metadata
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert not any("_checkpoint_wrapped_module" in k for k in keys)
    plain, _, _ = build(seed=3)
    load_model_weights(path, plain)
    expected = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in model.named_parameters()}
    assert_same(expected, dict(plain.named_parameters()))


def _drop_from_manifest(path: Path, part: str) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m["parts"].remove(part)
    m["files"] = {k: v for k, v in m["files"].items() if not k.startswith(part)}
    (path / "manifest.json").write_text(json.dumps(m))


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {
    "optimizer removed": (lambda p: shutil.rmtree(p / "optimizer"), "optimizer state missing from"),
    "optimizer unlisted": (lambda p: _drop_from_manifest(p, "optimizer"), "optimizer state missing from"),
    "optimizer corrupted": (lambda p: _flip_byte(p / "optimizer/__0_0.distcp"), "optimizer state in"),
    "manifest missing": (lambda p: (p / "manifest.json").unlink(), "manifest missing from"),
    "model truncated": (
        lambda p: os.truncate(p / "model/__0_0.distcp", (p / "model/__0_0.distcp").stat().st_size // 2),
        "model weights in",
    ),
    "model metadata missing": (lambda p: (p / "model/.metadata").unlink(), "model weights missing from"),
    "scheduler zero bytes": (lambda p: (p / "scheduler.json").write_bytes(b""), "scheduler state in"),
    "rng missing": (lambda p: (p / "rng/rank-00000.json").unlink(), "RNG state of rank 0 missing from"),
    "data state missing": (lambda p: (p / "data/rank-00000.json").unlink(), "data-loader state of rank 0 missing"),
    "train state missing": (lambda p: (p / "train_state.json").unlink(), "train state missing from"),
    "meta missing": (lambda p: (p / "meta.json").unlink(), "meta missing from"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_refused_naming_the_part(ckpt_copy, case):
    damage, expected = DAMAGE[case]
    damage(ckpt_copy)
    model, opt, sched = build(seed=9)
    before = snapshot(model, opt)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt_copy, model=model, optimizer=opt, scheduler=sched)
    assert expected in str(err.value) and str(ckpt_copy) in str(err.value)
    assert_same(before, snapshot(model, opt))  # refused before anything was loaded: nothing trains
    assert ckpt_cli(["verify", str(ckpt_copy)]) == 1


def test_verify_cli_exits_nonzero_naming_the_part(ckpt_copy, capsys):
    assert ckpt_cli(["verify", str(ckpt_copy)]) == 0 and "OK" in capsys.readouterr().out
    assert ckpt_cli(["list", str(ckpt_copy.parent)]) == 0 and "step 3" in capsys.readouterr().out
    shutil.rmtree(ckpt_copy / "optimizer")
    bad = subprocess.run([sys.executable, "-m", "training.checkpoint", "verify", str(ckpt_copy)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 1 and "optimizer state missing from" in bad.stderr


def test_reset_optimizer_is_deliberate_and_loud(ckpt_copy, caplog):
    shutil.rmtree(ckpt_copy / "optimizer")
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        out, (model, opt, _) = _load(ckpt_copy, reset_optimizer=True)
    assert "RESET OPTIMIZER" in caplog.text
    assert out["audit"]["optimizer"].startswith("RESET") and not opt.state
    saved_lr = json.loads((ckpt_copy / "scheduler.json").read_text())["_last_lr"]
    assert [g["lr"] for g in opt.param_groups] == saved_lr  # not the construction LR


def test_size_only_verification_skips_hashing(ckpt_copy):
    out, _ = _load(ckpt_copy, verify="size")
    assert out["audit"]["bytes_hashed_by_this_rank"] == 0
    with pytest.raises(ValueError, match="verify"):
        _load(ckpt_copy, verify="none")


@pytest.mark.parametrize("layers", [1, 3])
def test_model_that_does_not_fit_is_refused(base_ckpt, layers):
    model, opt, sched = build(seed=0, layers=layers)
    with pytest.raises(CheckpointError, match="model weights in .* (do not fit|does not fit)"):
        load_checkpoint(base_ckpt, model=model, optimizer=opt, scheduler=sched)


def test_load_model_weights_needs_no_optimizer(ckpt_copy, base_ckpt):
    shutil.rmtree(ckpt_copy / "optimizer")
    a, _, _ = build(seed=7)
    meta = load_model_weights(ckpt_copy, a)
    b, _, _ = build(seed=8)
    load_checkpoint(base_ckpt, model=b, optimizer=torch.optim.AdamW(b.parameters()), scheduler=_sched(b))
    assert meta["step"] == 3
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _sched(model):
    opt = torch.optim.AdamW(model.parameters())
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_keep_last(tmp_path):
    model, opt, sched = build(seed=0, genesis=False)
    with pytest.raises(ValueError, match="keep_last must be >= 2"):
        _save(tmp_path, 1, model, opt, sched, keep_last=1)
    for step in range(1, 5):
        train_steps(model, opt, sched, 1)
        _save(tmp_path, step, model, opt, sched)
    assert [s for s, _ in committed(tmp_path)] == [3, 4]
    _save(tmp_path, 5, model, opt, sched, keep_last=3)
    assert [s for s, _ in committed(tmp_path)] == [3, 4, 5]


def test_never_overwrites_or_mixes_runs(tmp_path):
    model, opt, sched = build(seed=0, genesis=False)
    train_steps(model, opt, sched, 1)
    first = _save(tmp_path, 4, model, opt, sched)
    mtime = (first / "manifest.json").stat().st_mtime_ns
    with pytest.raises(CheckpointError, match="already exists"):
        _save(tmp_path, 4, model, opt, sched)
    with pytest.raises(CheckpointError, match="later step"):
        _save(tmp_path, 2, model, opt, sched)
    assert (first / "manifest.json").stat().st_mtime_ns == mtime and not leftovers(tmp_path)


def test_unserialisable_state_is_refused_before_writing(tmp_path):
    model, opt, sched = build(seed=0, genesis=False)
    with pytest.raises(CheckpointError, match="data_state of rank 0 is not JSON-serialisable"):
        _save(tmp_path, 1, model, opt, sched, data_state={"buf": torch.zeros(2)})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("how", ["per-rank files", "inside DCP shards"])
def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, how):
    model, opt, sched = build(seed=0, genesis=False)
    train_steps(model, opt, sched, 1)
    prev = _save(tmp_path, 1, model, opt, sched)
    train_steps(model, opt, sched, 1)
    if how == "per-rank files":
        monkeypatch.setenv("GENESIS_CKPT_TEST_FAIL", "writing per-rank state:enospc")
    else:
        import torch.distributed.checkpoint.filesystem as fs

        def full_disk(transforms, stream, *args, **kwargs):
            stream.write(b"\0" * 64)  # a partly written shard, then the device is full
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(fs, "_write_item", full_disk)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 2, model, opt, sched)
    msg = str(err.value)
    assert "No space left on device" in msg and "step 2" in msg and str(prev) in msg
    assert not leftovers(tmp_path) and latest_checkpoint(tmp_path) == prev
    monkeypatch.undo()
    assert ckpt_cli(["verify", str(prev)]) == 0
    assert _load(prev, genesis=False)[0]["train_state"]["step"] == 1


def test_latest_and_resolve_resume(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) is None and resolve_resume("auto", root) is None
    assert resolve_resume(None, root) is None and resolve_resume("", root) is None
    model, opt, sched = build(seed=0, genesis=False)
    p1 = _save(root, 1, model, opt, sched)
    p2 = _save(root, 2, model, opt, sched)
    (root / ".tmp-step-00000003-dead").mkdir()
    (root / "step-00000009").mkdir()  # no manifest: never a checkpoint (damaged or hand-made)
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        assert latest_checkpoint(root) == p2 and resolve_resume("auto", root) == p2
    assert ".tmp-step-00000003-dead" in caplog.text
    assert any(r.levelname == "ERROR" and "step-00000009" in r.getMessage() for r in caplog.records)
    assert resolve_resume(str(p2), root) == p2
    with pytest.raises(CheckpointError, match="older than"):
        resolve_resume(str(p1), root)
    with pytest.raises(CheckpointError, match="checkpoint root"):
        resolve_resume(str(root), root)
    with pytest.raises(CheckpointError, match="manifest missing"):
        resolve_resume(str(root / "step-00000009"), root)
    assert read_meta(p2)["step"] == 2
    for p in (p1, p2):
        (p / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="refusing to start from scratch"):
        resolve_resume("auto", root)


def test_other_world_size_needs_the_explicit_flag(ckpt_copy, caplog):
    m = json.loads((ckpt_copy / "manifest.json").read_text())
    (ckpt_copy / "manifest.json").write_text(json.dumps(m | {"world_size": 2}))
    with pytest.raises(CheckpointError, match="saved by 2 ranks, this run has 1"):
        _load(ckpt_copy)
    seed_all(5)
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        out, (model, opt, _) = _load(ckpt_copy, reset_rng_and_data=True)
    assert out["data_state"] is None and out["audit"]["data_state"].startswith("RESET")
    assert "RESET RNG AND DATA STATE" in caplog.text
    assert out["audit"]["optimizer_groups"][0]["step_max"] == 3.0


def test_check_resume_compatible(caplog):
    saved = dict(META, tokens_per_step=128)
    assert check_resume_compatible(saved, META) == []  # tokens_per_step derived from its factors
    for field, value in [("world_size", 2), ("seq_len", 32), ("tokenizer_fingerprint", "zzz"),
                         ("per_device_train_batch_size", 1), ("gradient_accumulation_steps", 8)]:  # fmt: skip
        with pytest.raises(CheckpointError, match=field):
            check_resume_compatible(saved, {**META, field: value})
    current = {**META, "gradient_accumulation_steps": 8}  # changes tokens_per_step too
    with pytest.raises(CheckpointError, match="tokens_per_step"):
        check_resume_compatible(saved, current, ["gradient_accumulation_steps"])
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        used = check_resume_compatible(saved, current, ["gradient_accumulation_steps", "tokens_per_step"])
    assert used == ["tokens_per_step", "gradient_accumulation_steps"]
    assert "resume override: gradient_accumulation_steps" in caplog.text
    with pytest.raises(ValueError, match="unknown override"):
        check_resume_compatible(saved, META, ["seq_length"])
