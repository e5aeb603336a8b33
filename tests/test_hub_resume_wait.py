"""`--resume hub:...` on several ranks: rank 0 downloads, the others wait for it outside any collective
(training/hub_resume.py). On 2 gloo ranks whose process-group timeout is cut to 2 s, a download slowed
to 4 s must still reach both ranks, a failed one must give both the same error, and the wait has its
own limit (sized by `download_timeout_s`), with progress logged on both sides.

About 15 s on a shared 2-core machine (one 2-rank launch)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from _dist import run_ranks
from genesis_fake_hub import FakeHfApi, fake_hub_env

from training.hub_resume import checkpoint_bytes, download_timeout_s

REPO = "genesis-test/tiny"
PG_TIMEOUT_S = 2.0
DELAY_S = 4.0  # each fake download: twice the process-group timeout


def make_hub(root: Path) -> Path:
    """A fake Hub holding one checkpoint/ at revision step-00000002 (what HubSync uploads)."""
    from huggingface_hub import CommitOperationAdd

    api = FakeHfApi(root)
    api.create_repo(REPO)
    files = {"checkpoint/manifest.json": b'{"step": 2}', "checkpoint/model/__0_0.distcp": os.urandom(300_000)}
    ops = []
    for rel, data in files.items():
        (root / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / rel).write_bytes(data)
        ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(root / "src" / rel)))
    api.create_commit(REPO, ops, commit_message="step 2")
    api.create_branch(REPO, branch="step-00000002")
    return root


def resume_on_every_rank(rank: int, world: int, out: str) -> dict:
    """On each rank (tests/_dist.py): three hub resumes with a slow fake download; what each one gave."""
    import datetime

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.distributed_c10d import _set_pg_timeout

    from training import hub_resume

    # Accelerate's view is a real multi-process one (its collectives are not no-ops), as under a launch.
    assert PartialState(cpu=True).distributed_type == DistributedType.MULTI_CPU
    _set_pg_timeout(datetime.timedelta(seconds=PG_TIMEOUT_S))  # what a tiny pg_timeout_minutes gives
    hub_resume.PROGRESS_EVERY_S = 0.5
    fail = {"now": False}
    original = FakeHfApi.snapshot_download

    def slow_download(self, *args, **kwargs):  # the files land, then the link is slow (or drops)
        result = original(self, *args, **kwargs)
        time.sleep(DELAY_S)
        if fail["now"]:
            raise ConnectionError("connection reset by peer (fake)")
        return result

    FakeHfApi.snapshot_download = slow_download
    accelerator = SimpleNamespace(is_main_process=rank == 0, num_processes=world, process_index=rank)

    def attempt(**kwargs) -> dict:
        t0 = time.monotonic()
        try:
            got = hub_resume.resolve_hub_resume(f"hub:{REPO}@step-00000002", out, accelerator, **kwargs)
            return {"path": got, "s": time.monotonic() - t0}
        except Exception as e:  # noqa: BLE001  (compared across ranks)
            return {"error": f"{type(e).__name__}: {e}", "s": time.monotonic() - t0}

    results = {"slow": attempt()}
    fail["now"] = True
    results["failed"] = attempt()
    fail["now"] = False
    results["timeout"] = attempt(floor_minutes=1 / 60)  # the wait's own limit: 1 s, the download takes 4
    return results


@pytest.mark.distributed
def test_a_slow_download_outlasts_the_process_group_timeout(tmp_path):
    hub = make_hub(tmp_path / "hub")
    res = run_ranks("test_hub_resume_wait:resume_on_every_rank", 2, kwargs={"out": str(tmp_path / "run")},
                    env=fake_hub_env(hub), result_dir=tmp_path / "results", timeout=120)
    assert all(r.returncode == 0 for r in res), "\n".join(r.stderr[-3000:] for r in res)
    r0, r1 = (r.value for r in res)

    # Both ranks got the downloaded folder, after waiting longer than a collective may.
    assert r0["slow"]["path"] == r1["slow"]["path"], (r0, r1)
    assert Path(r0["slow"]["path"], "manifest.json").is_file()
    assert r1["slow"]["s"] > PG_TIMEOUT_S * 1.5
    # A download that fails after a long time: the same error on both ranks, not a timeout on one.
    assert r0["failed"] == {**r0["failed"], "error": r1["failed"]["error"]}
    assert r0["failed"]["error"].startswith("CheckpointError: --resume hub:genesis-test/tiny@step-00000002: "
                                            "download failed: ConnectionError: connection reset"), r0
    # The wait has its own limit: the waiting rank gives up with one line naming it; rank 0 finished.
    assert "path" in r0["timeout"]
    assert r1["timeout"]["error"].startswith("CheckpointError: --resume hub:genesis-test/tiny@step-00000002: "
                                             "rank 1 waited 0.0 min for rank 0 to download"), r1
    assert 1.0 <= r1["timeout"]["s"] < DELAY_S
    # Progress in the log: bytes on rank 0's disk; the waiting rank says what it waits for.
    assert "--resume hub:genesis-test/tiny@step-00000002: 0.00 GB of ? on disk" in res[0].stderr
    assert "rank 1 waiting for rank 0's download" in res[1].stderr


def test_the_wait_is_sized_to_the_checkpoint():
    assert download_timeout_s(None) == 3600  # size unknown: the floor
    assert download_timeout_s(12_000_000_000) == 12_000  # 12 GB at 1 MB/s: 3 h 20 min
    assert download_timeout_s(1_000, floor_minutes=90) == 5400

    class Api:
        def list_repo_tree(self, repo, *, path_in_repo, revision, recursive):
            assert (repo, path_in_repo, revision, recursive) == (REPO, "checkpoint", "step-00000002", True)
            return [SimpleNamespace(path="checkpoint/model", size=None),  # a folder has no size
                    SimpleNamespace(path="checkpoint/model/__0_0.distcp", size=6_000_000_000),
                    SimpleNamespace(path="checkpoint/model/__1_0.distcp", size=6_000_000_000)]

    assert checkpoint_bytes(Api(), REPO, "step-00000002") == 12_000_000_000
    assert checkpoint_bytes(object(), REPO, "step-00000002") is None  # no listing: the floor applies
