"""Training metrics: FLOPs per token, MFU, tokens/s, peak memory, metrics.jsonl and wandb.

FLOPs per token follow the PaLM convention (PERFORMANCE.md):
    6 * N + 12 * L * H * Q * T
N = matmul parameters (every weight matrix, the tied embedding/head counted once; norms and
other vectors excluded), L layers, H query heads, Q head dim, T sequence length. Recompute from
activation checkpointing is not counted (that would be hardware FLOPs, not model FLOPs).
MFU = tokens/s per GPU x FLOPs per token / the GPU's peak dense bf16 FLOP/s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Peak dense bf16 tensor-core FLOP/s with FP32 accumulate (what PyTorch uses), no sparsity.
# Matched against torch.cuda.get_device_name() by substring; the LONGEST matching key wins, so
# "H100" never captures "NVIDIA H100 NVL" or "NVIDIA H100 PCIe", whatever the order here.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("RTX 4090", 165.2),  # 330 is the FP16-accumulate number; PyTorch accumulates in fp32
    ("RTX 3090", 71.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),  # NVIDIA's H100 NVL sheet: 1,671 TFLOP/s bf16 with sparsity = 835 dense
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.0),  # NVIDIA's H200 NVL sheet: 1,671 with sparsity, as the H100 NVL
    ("H200", 989.0),  # SXM: "NVIDIA H200"
    ("A100", 312.0),
]


def peak_tflops_for(name: str) -> float | None:
    """Peak dense bf16 TFLOP/s for a CUDA device name, or None when the table does not know it."""
    hits = [(key, tflops) for key, tflops in PEAK_BF16_TFLOPS if key.lower() in name.lower()]
    return max(hits, key=lambda hit: len(hit[0]))[1] if hits else None


def peak_flops(device: torch.device | str | None = None) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s or None, a human note). CPU or an unknown GPU -> None, said plainly."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None, "CPU: no MFU"
    name = torch.cuda.get_device_name(device)
    tflops = peak_tflops_for(name)
    if tflops is None:
        return None, f"{name}: unknown GPU, peak FLOPs not in training/metrics.py, MFU not reported"
    return tflops * 1e12, f"{name}: peak {tflops} TFLOP/s bf16"


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: >= 2-D weights, each tensor once (tied head once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already de-duplicates tied tensors
        if p.dim() >= 2 and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def flops_per_token(config, seq_len: int, n_matmul: int) -> float:
    """6N + 12 L H Q T (PERFORMANCE.md). config: a GenesisConfig/LlamaConfig."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    return 6.0 * n_matmul + attn


def mfu(tokens_per_s_per_device: float, flops_tok: float, peak: float | None) -> float | None:
    if peak is None or peak <= 0:
        return None
    return tokens_per_s_per_device * flops_tok / peak


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def host_pinned_gb(device: torch.device) -> float | None:
    """Host memory this process holds pinned through torch's caching host allocator (async-save
    staging), GiB; blocks are rounded up to a power of two and kept. None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) / 2**30


# Anything that looks like a credential is dropped from configs before they are logged.
_SECRET_KEY = re.compile(r"(token|secret|password|api[_-]?key|auth|credential)", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{10,}|[0-9a-f]{40})$")


def scrub(config: dict) -> dict:
    """A copy of `config` without token-like keys or values (and without env secrets' values)."""
    secrets = {v for k in ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN") if (v := os.environ.get(k))}
    out = {}
    for k, v in config.items():
        if _SECRET_KEY.search(str(k)) and "tokenizer" not in str(k) and "tokens" not in str(k):
            continue
        if isinstance(v, dict):
            v = scrub(v)
        elif isinstance(v, str) and (v in secrets or _SECRET_VALUE.match(v) or any(s in v for s in secrets)):
            continue
        out[k] = v
    return out


def is_side_record(record: dict) -> bool:
    """A metrics.jsonl record that is not a training step: a checkpoint save, the save plan, a Hub
    upload ({"event": ...}). A stopped run's last record ({"event": "stopped", "step", "loss"...})
    is a step. Readers keep side records off the step curves."""
    event = record.get("event")
    return isinstance(event, str) and event != "stopped"


class MetricsLogger:
    """Main-process sink: <output_dir>/metrics.jsonl (one object per logged step) and wandb.

    Only rank 0 constructs one with enabled=True; the others get a no-op logger so the
    loop calls it unconditionally.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool, report_to: str = "none",
                 project: str = "genesis", run_name: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.wandb_run = None
        self.path = Path(output_dir) / "metrics.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        if report_to == "wandb":
            self.wandb_run = _init_wandb(Path(output_dir), project, run_name, scrub(config or {}))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        # One line per step, flushed: a SIGKILL loses at most the line being written.
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        if self.wandb_run is not None and is_side_record(record):
            # A side record (a checkpoint save, the save plan, a Hub upload) is no training step:
            # it goes to the run's summary (latest values, under the event's name), never into the
            # step history, whose rows are one per step. metrics.jsonl keeps every one of them.
            for k, v in record.items():
                if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                    self.wandb_run.summary[f"{record['event']}/{k}"] = v
        elif self.wandb_run is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
            for src, n in (record.get("tokens_by_source") or {}).items():
                flat[f"tokens/{src}"] = n
            for key in ("val_loss", "val_bpb", "val_unigram", "val_bigram", "val_bigram_bpb", "val_vs_bigram"):
                for src, v in (record.get(key) or {}).items():
                    flat[f"{key}/{src}"] = v
            self.wandb_run.log(flat, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _init_wandb(output_dir: Path, project: str, run_name: str | None, config: dict):
    import wandb

    # Online only with a key in the environment (never from a file we write); else offline.
    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        os.environ["WANDB_MODE"] = "offline"
        logger.info("wandb: no WANDB_API_KEY in the environment, logging offline to %s/wandb", output_dir)
    # resume="allow" with a run id stored beside the metrics keeps one wandb run across restarts.
    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    # No command line, code or git metadata: a token passed on a command line once leaked this way.
    settings = wandb.Settings(x_disable_meta=True, disable_code=True, disable_git=True, save_code=False)
    return wandb.init(project=project, name=run_name or output_dir.name, id=run_id, resume="allow",
                      dir=str(output_dir), config=config, settings=settings)
