"""Async-save staging and the start-up plan: what the background writer may touch, what staging
allocates against what was planned (the 1B at its real shard shapes), and the disk check.

issue 17 items 1 and 2 and its "Bad input" line; docs/checkpoints.md, "Async saves".
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
import torch
from _checkpoint_fixtures import build, train_steps
from _dist import run_ranks
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import run_pretrain

from training.checkpoint import CheckpointError
from training.checkpoint import async_save as A
from training.checkpoint import staging as S

KW = dict(train_state={"step": 1}, data_state={"pos": 1}, meta={"m": 1})


class _FakeStream:
    def __init__(self, calls):
        self.calls = calls

    def __getattr__(self, name):  # synchronize, wait_stream, query, ...
        return lambda *a, **k: self.calls.append((f"stream.{name}", threading.current_thread().name, a))


def _patch_cuda(monkeypatch) -> list[tuple[str, str, tuple]]:
    """torch.cuda as if a GPU were there: every entry point records (name, calling thread, args)."""
    calls: list[tuple[str, str, tuple]] = []

    def rec(name, ret=None):
        def f(*a, **k):
            calls.append((name, threading.current_thread().name, a))
            return ret(calls) if callable(ret) else ret
        return f

    for name, ret in [("is_available", lambda c: True), ("current_stream", _FakeStream),
                      ("default_stream", _FakeStream), ("Stream", _FakeStream), ("Event", _FakeStream),
                      ("stream", lambda c: contextlib.nullcontext()), ("device", lambda c: contextlib.nullcontext()),
                      ("current_device", lambda c: 1), ("set_device", None), ("synchronize", None),
                      ("_lazy_init", None), ("init", None), ("cudart", None)]:
        monkeypatch.setattr(torch.cuda, name, rec(name, ret))
    from torch.cuda import _pin_memory_utils

    monkeypatch.setattr(_pin_memory_utils, "pin_memory", rec("cudaHostRegister"))
    monkeypatch.setattr(_pin_memory_utils, "unpin_memory", rec("cudaHostUnregister"))
    return calls


def test_the_background_writer_makes_no_cuda_call_but_setting_its_device(tmp_path, monkeypatch):
    """Item 1. A real async save in one process with torch.cuda patched to say a GPU is there, and
    the state taken as if on cuda:1: the only CUDA call from any thread but the training thread is
    the writer's set_device(cuda:1). Before the fix DCP's copy-ahead loader called current_stream()
    and stream.synchronize() from the writer thread (a context on GPU 0 for rank 1)."""
    model, opt, sched = build(seed=0, genesis=False)
    train_steps(model, opt, sched, 1)
    ck = A.Checkpointer(tmp_path, mode="async", keep_last=2, timeout_s=60)
    calls = _patch_cuda(monkeypatch)
    monkeypatch.setattr(S, "_cuda_device_of", lambda tensors: torch.device("cuda", 1), raising=False)
    ck.save(1, model=model, optimizer=opt, scheduler=sched, **KW)
    ck.close()
    (rec,) = ck.records()
    assert rec["step"] == 1
    main = threading.main_thread().name
    off_main = [(n, t, a) for n, t, a in calls if t != main and n != "is_available"]
    assert off_main == [("set_device", "ckpt-async-save-1", (torch.device("cuda", 1),))], off_main
    # The training thread pinned each part's flat buffer once and waited for its copies.
    assert [n for n, t, _ in calls if t == main and n == "cudaHostRegister"] == ["cudaHostRegister"] * 2
    assert ("synchronize", main, (torch.device("cuda", 1),)) in calls


def test_the_stager_allocates_what_was_planned(tmp_path):
    """Item 2 on CPU: one flat buffer per part, every staged tensor a view into it, and their bytes
    equal to the plan made before the optimizer had any state (tied weight and AdamW steps included)."""
    from _checkpoint_fixtures import tiny_config

    from genesis_hf import GenesisForCausalLM

    torch.manual_seed(0)
    model = GenesisForCausalLM(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    planned = S.staging_need(model)
    mode, plan = S.plan_mode("async", model)
    assert mode == "async" and plan["need_bytes"] == planned
    train_steps(model, opt, sched, 1)
    ck = A.Checkpointer(tmp_path, mode="async", keep_last=2, timeout_s=60)
    for step in (1, 2):  # the second save reuses the buffers
        ck.save(step, model=model, optimizer=opt, scheduler=sched, **KW)
        ck.close()
    assert ck.staging_bytes == planned
    stager = ck._stager
    assert sorted(stager._flat) == ["model", "optimizer"]
    assert sum(f.buffer.numel() for f in stager._flat.values()) == planned
    for flat in stager._flat.values():
        lo, hi = flat.buffer.data_ptr(), flat.buffer.data_ptr() + flat.buffer.numel()
        assert all(lo <= v.data_ptr() and v.data_ptr() + v.nbytes <= hi for v in flat.views)
    # What was written is what the training thread held.
    from training.checkpoint import load_checkpoint

    fresh = GenesisForCausalLM(tiny_config())
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    load_checkpoint(tmp_path / "step-00000002", model=fresh, optimizer=fresh_opt,
                    scheduler=torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def fsdp_async_save(rank: int, world: int, root: str) -> dict:
    """Runs in each of 2 gloo ranks: FSDP2 shards (DTensors) staged, written in the background while
    training goes on, and loaded back equal to the state at the save."""
    from _checkpoint_fixtures import snapshot

    from training.checkpoint import load_checkpoint
    from training.checkpoint.layout import read_manifest

    model, opt, sched = build(seed=0, shard=True)
    train_steps(model, opt, sched, 2)
    mode, plan = S.plan_mode("async", model, root, keep_last=2)
    ck = A.Checkpointer(root, mode="async", keep_last=2, timeout_s=60)
    ck.save(2, model=model, optimizer=opt, scheduler=sched, **KW)
    at_save = snapshot(model, opt)
    train_steps(model, opt, sched, 2)
    ck.close()
    fresh, fresh_opt, fresh_sched = build(seed=1, shard=True)
    load_checkpoint(Path(root) / "step-00000002", model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    loaded = snapshot(fresh, fresh_opt)
    written = sum(f["size"] for f in read_manifest(Path(root) / "step-00000002")["files"].values())
    return {"mode": mode, "planned": S.staging_need(model), "need_bytes": plan["need_bytes"],
            "staged": ck.staging_bytes, "checkpoint_bytes": plan["checkpoint_bytes"], "written": written,
            "dtensor": type(model.model.embed_tokens.weight).__name__,
            "same": sorted(at_save) == sorted(loaded) and all(torch.equal(at_save[k], loaded[k]) for k in at_save)}


@pytest.mark.distributed
def test_fsdp2_shards_are_staged_as_planned_and_load_back(tmp_path):
    res = run_ranks("test_checkpoint_staging:fsdp_async_save", 2, kwargs={"root": str(tmp_path / "ck")},
                    result_dir=tmp_path / "r", timeout=150)
    for r in res:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.stderr[-4000:]}"
        v = r.value
        assert v["dtensor"] == "DTensor" and v["mode"] == "async" and v["same"]
        assert v["staged"] == v["planned"] > 0
        assert v["need_bytes"] == max(x.value["planned"] for x in res)  # the largest shard decides
        assert v["checkpoint_bytes"] >= v["written"]  # every rank's shards, on the shared folder


def _shard_like_fsdp2(model: torch.nn.Module, rank: int, world: int) -> None:
    """Replace every parameter by this rank's dim-0 chunk (FSDP2's Shard(0)), tied ones once."""
    new: dict[int, torch.nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) not in new:
                per = -(-p.shape[0] // world)
                lo, hi = min(p.shape[0], rank * per), min(p.shape[0], (rank + 1) * per)
                new[id(p)] = torch.nn.Parameter(torch.empty((hi - lo, *p.shape[1:]), dtype=p.dtype, device="meta"))
            if p is not None:
                mod._parameters[name] = new[id(p)]


def test_the_1b_plan_equals_what_staging_allocates():
    """Item 2 at the real size: the 1B on the meta device, rank 0's shard of 2, a real AdamW step
    (meta moments, CPU step counts) and get_state_dict as a save sees them. The plan is what the
    stager's flat buffers take, byte for byte: the shards of the weights and both moments (5.59 GiB;
    the tied embedding once) and a 64-byte slot per AdamW step count. torch's per-tensor pin_memory()
    would have pinned 7.75 GiB for the same state (7.50 without the tied weight's second name)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from genesis_hf import GenesisConfig, GenesisForCausalLM

    with torch.device("meta"):
        model = GenesisForCausalLM(GenesisConfig())
    assert sum(p.numel() for p in model.parameters()) == 1_000_441_344
    _shard_like_fsdp2(model, rank=0, world=2)
    planned = S.staging_need(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    staged = S.flat_bytes(S._tensors(model_sd)) + S.flat_bytes(S._tensors(optim_sd))
    shards = sum(p.numel() for p in model.parameters()) * 4 * 3  # fp32 weights + 2 moments
    assert staged == planned == shards + 290 * S.ALIGN == 6_002_666_624  # 5.59 GiB

    def power_of_two(n):
        return 1 << (n - 1).bit_length()

    per_tensor_pinned = sum(power_of_two(t.numel() * t.element_size())
                            for t in S._tensors(model_sd) + S._tensors(optim_sd) if t.dim() > 0)
    assert round(per_tensor_pinned / 2**30, 2) == 7.75
    old_plan = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    assert round(old_plan / 2**30, 2) == 5.59


# ------------------------------------------------------------------ the disk check ("Bad input")


def test_disk_plan_needs_every_checkpoint_that_exists_at_once(tmp_path, monkeypatch):
    model, opt, sched = build(seed=0, genesis=False)
    root = tmp_path / "out" / "checkpoints"
    ckpt = S.checkpoint_bytes(model)
    # keep_last 2 + the one being written = 3 at once, none there yet.
    monkeypatch.setenv("GENESIS_TEST_DISK_FREE_BYTES", str(3 * ckpt - 1))
    with pytest.raises(CheckpointError) as e:
        S.plan_mode("sync", model, root, keep_last=2)
    msg = str(e.value)
    assert "\n" not in msg and f"output_dir {tmp_path / 'out'}" in msg
    assert "3 exist at once (keep_last 2 + the one being written; 0 already there)" in msg
    assert f"{3 * ckpt / 2**30:.2f} GiB must be free" in msg and "larger disk" in msg
    monkeypatch.setenv("GENESIS_TEST_DISK_FREE_BYTES", str(3 * ckpt))
    mode, plan = S.plan_mode("async", model, root, keep_last=2)
    assert mode == "async" and (plan["checkpoint_bytes"], plan["disk_need_bytes"]) == (ckpt, 3 * ckpt)
    # Resuming with keep_last committed already: one more checkpoint must fit.
    monkeypatch.setenv("GENESIS_TEST_DISK_FREE_BYTES", str(ckpt))
    with monkeypatch.context() as m:
        m.setattr(S.L, "committed", lambda r: [(2, r / "step-00000002"), (4, r / "step-00000004")])
        root.mkdir(parents=True)
        assert S.plan_mode("sync", model, root, keep_last=2)[1]["disk_need_bytes"] == ckpt


def test_the_estimate_covers_what_a_save_writes(tmp_path):
    """checkpoint_bytes is at least what a real save writes, and the tensor bytes in it are most of
    what is written: model shards (the tied weight under both names) and AdamW's state."""
    from training.checkpoint import save_checkpoint
    from training.checkpoint.layout import read_manifest

    model, opt, sched = build(seed=0, genesis=True)
    train_steps(model, opt, sched, 1)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, **KW)
    written = sum(f["size"] for f in read_manifest(path)["files"].values())
    tensors = sum(S._tensor_bytes(ts) for ts in S.staging_parts(model).values())
    assert tensors < written <= S.checkpoint_bytes(model)


@pytest.mark.distributed
def test_pretrain_refuses_a_disk_too_small_before_step_1(embedded_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    res = run_pretrain(out, embedded_data, "--max_steps", "2", "--save_steps", "2", "--save_mode", "async",
                       nproc=1, env={"GENESIS_TEST_DISK_FREE_BYTES": "1000"})
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("pretrain: not enough disk for checkpoints")]
    assert len(lines) == 1 and f"output_dir {out}" in lines[0] and "0.00 GiB is" in lines[0]
    assert not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text()
