"""accelerate_configs/multi_node.yaml as two "machines" on localhost: machine_rank 0 and 1, one gloo CPU
process each, both started by `accelerate launch` with the main address 127.0.0.1 (docs/pretraining.md,
"Two machines"). The file says `distributed_type: FSDP`, so its ranks take Accelerate's FSDP2 path through
tests/fsdp_on_cpu (tests/_fsdp_cpu.py), as fsdp_2gpu_pcie.yaml's do.

Which launcher: `accelerate launch` itself. A config with `distributed_type: FSDP` and without `use_cpu`
goes to `multi_gpu_launcher` (accelerate/commands/launch.py), i.e. torchrun with `--nnodes 2
--node_rank <machine_rank>` and, as the file has `same_network: false`, a static rendezvous at
`main_process_ip:main_process_port`; nothing in that path asks for a GPU. (`--cpu` / `use_cpu: true`
would send it to `simple_launcher`, which starts multi-process CPU jobs through mpirun, not torchrun.)
pretrain.py then sets up gloo on CPU, and the shim grants FSDP.

The run trains, saves, has BOTH machines SIGKILLed (every process of both launchers, mid-run), is
resumed with `--resume auto` on both, and logs the same per-step losses, grad norms and LRs as an
uninterrupted two-machine run, bit for bit. 53 s at load average 6 on 2 cores (three runs of 8 steps).
"""

from __future__ import annotations

import subprocess

import pytest
from _fsdp_cpu import fsdp_env
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import REPO, SCRIPT, _env, command, free_port, kill_tree, read_metrics, wait_for

pytestmark = pytest.mark.distributed

MULTI_NODE = REPO / "accelerate_configs" / "multi_node.yaml"
N = 8
ARGS = ("--max_steps", str(N), "--save_steps", "2", "--logging_steps", "1", "--resume", "auto")


def start_machines(out, data, port: int) -> list[subprocess.Popen]:
    """Both "machines": the same command but `--machine_rank`, 2 processes in all (1 per machine).
    Each machine's ranks log their batches under out/batches-m<machine_rank>/rank-<rank>.jsonl, which
    shows which global rank ran on which machine."""
    procs = []
    for machine in (0, 1):
        cmd = command(out, data, *ARGS, nproc=2, config=MULTI_NODE)
        at = cmd.index(str(SCRIPT))
        cmd[at:at] = ["--num_machines", "2", "--machine_rank", str(machine),
                      "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]  # the last port wins
        env = _env(fsdp_env({"GENESIS_TEST_BATCH_LOG": str(out / f"batches-m{machine}")}))
        log = open(out / f"machine-{machine}.log", "a")  # noqa: SIM115  (closed when the process ends)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen], out, timeout: float = 300) -> None:
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_tree(p.pid)
        pytest.fail(f"two-machine run did not finish in {timeout}s\n{(out / 'machine-0.log').read_text()[-4000:]}")
    logs = "\n".join((out / f"machine-{m}.log").read_text()[-3000:] for m in (0, 1))
    assert codes == [0, 0], f"exit codes {codes}\n{logs}"


def run_machines(out, data) -> None:
    out.mkdir(parents=True, exist_ok=True)
    finish(start_machines(out, data, free_port()), out)


def test_two_machines_train_are_killed_and_resume_identically(embedded_data, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    run_machines(straight, embedded_data)
    log = (straight / "machine-0.log").read_text()
    assert "start-up all-reduce over 2 process(es)" in log and "(DistributedType.FSDP)" in log
    assert "FSDP2: " in log and "GenesisDecoderLayer x2" in log
    # One process per machine: global rank 0 ran under machine_rank 0, rank 1 under machine_rank 1.
    assert sorted(p.name for p in (straight / "batches-m0").iterdir()) == ["rank-0.jsonl"]
    assert sorted(p.name for p in (straight / "batches-m1").iterdir()) == ["rank-1.jsonl"]

    # Kill both machines (SIGKILL, every process of both launchers) once step 2's checkpoint is committed.
    out = tmp_path / "killed"
    out.mkdir()
    procs = start_machines(out, embedded_data, free_port())
    wait_for(out / "checkpoints" / "step-00000002", procs[0])
    for p in procs:
        kill_tree(p.pid)
        p.wait(timeout=30)
    killed_at = max(read_metrics(out))
    assert killed_at < N, f"the run finished (step {killed_at}) before it was killed"
    run_machines(out, embedded_data)
    resumed = (out / "machine-0.log").read_text()
    assert "resume audit:" in resumed and "optimizer: restored" in resumed

    a, b = read_metrics(straight), read_metrics(out)
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    for step in a:
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert a[step][key] == b[step][key], f"step {step}: {key} {a[step][key]!r} != {b[step][key]!r}"
