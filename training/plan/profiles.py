"""GPU profiles for the planner, read from training/plan/gpus.yaml (one readable table, with sources).

    profile = lookup("RTX 4090")            # exact name, case-insensitive, or a unique substring
    custom = GPUProfile.custom(vram_gb=20, tflops=120)   # an unlisted card (--vram-gb/--tflops)

A card whose constants `genesis plan calibrate --write` fitted carries its `calibrated:` note (source
file, date, rows) in `profile.extra["calibrated"]`; `--gpu list` marks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import yaml

TABLE = Path(__file__).with_name("gpus.yaml")
GIB = 2**30


class UnknownGPU(ValueError):
    """A --gpu name the table does not hold; the message lists the known ones."""


@dataclass(frozen=True)
class GPUProfile:
    name: str
    vram_gib: float
    bf16_tflops: float
    mem_gbps: float
    link: str  # the default link between two cards of this kind in one machine
    link_gbps: dict[str, float]  # bus bandwidth per link kind, GB/s per direction
    matmul_efficiency: tuple[float, float]
    memory_efficiency: tuple[float, float]
    link_efficiency: tuple[float, float]
    overlap: tuple[float, float]
    kernel_floor_us: float
    allocator_reserve_fraction: float
    cuda_context_gib: float
    nccl_buffers_gib: float
    internode_gbps: float
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def vram_bytes(self) -> int:
        return int(self.vram_gib * GIB)

    def overhead_bytes(self, world_size: int) -> int:
        """CUDA context + NCCL buffers (none in a single process)."""
        nccl = self.nccl_buffers_gib if world_size > 1 else 0.0
        return int((self.cuda_context_gib + nccl) * GIB)

    def with_overrides(self, *, vram_gb: float | None = None, tflops: float | None = None,
                       link: str | None = None) -> GPUProfile:
        out = self
        if vram_gb is not None:
            out = replace(out, vram_gib=float(vram_gb), name=f"{out.name} ({vram_gb:g} GiB)")
        if tflops is not None:
            out = replace(out, bf16_tflops=float(tflops), name=f"{out.name} ({tflops:g} TFLOP/s)")
        if link is not None:
            if link not in out.link_gbps or out.link_gbps[link] is None:
                raise ValueError(f"--link {link}: {out.name} has no {link} bandwidth "
                                 f"(known: {', '.join(k for k, v in out.link_gbps.items() if v)})")
            out = replace(out, link=link)
        return out

    @classmethod
    def custom(cls, *, vram_gb: float, tflops: float, mem_gbps: float | None = None) -> GPUProfile:
        """An unlisted card: memory and peak bf16 given, bandwidth scaled like a 4090 unless given."""
        base = lookup("RTX 4090")
        bw = mem_gbps if mem_gbps is not None else base.mem_gbps * tflops / base.bf16_tflops
        return replace(base, name=f"custom ({vram_gb:g} GiB, {tflops:g} TFLOP/s)", vram_gib=float(vram_gb),
                       bf16_tflops=float(tflops), mem_gbps=float(bw),
                       source="--vram-gb/--tflops; bandwidth scaled from the RTX 4090 by TFLOP/s; PCIe without P2P")


@lru_cache(maxsize=1)
def _table() -> dict[str, GPUProfile]:
    return load_table(TABLE)


def load_table(path: Path) -> dict[str, GPUProfile]:
    """Every profile of a gpus.yaml (`_table()` caches the repository's; calibrate reads a given one)."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    defaults, links = raw["defaults"], raw["link_gbps"]
    out = {}
    for name, g in raw["gpus"].items():
        c = {**defaults, **{k: v for k, v in g.items() if k in defaults}}
        link_gbps = {k: v for k, v in links.items() if v is not None}
        if g.get("nvlink_gbps"):
            link_gbps["nvlink"] = float(g["nvlink_gbps"])
        if g.get("link_gbps_override"):  # this card's own number for its default link
            link_gbps[g["link"]] = float(g["link_gbps_override"])
        out[name] = GPUProfile(
            name=name, vram_gib=float(g["vram_gib"]), bf16_tflops=float(g["bf16_tflops"]),
            mem_gbps=float(g["mem_gbps"]), link=g["link"], link_gbps=link_gbps,
            matmul_efficiency=tuple(c["matmul_efficiency"]), memory_efficiency=tuple(c["memory_efficiency"]),
            link_efficiency=tuple(c["link_efficiency"]), overlap=tuple(c["overlap"]),
            kernel_floor_us=float(c["kernel_floor_us"]), allocator_reserve_fraction=float(c["allocator_reserve_fraction"]),
            cuda_context_gib=float(c["cuda_context_gib"]), nccl_buffers_gib=float(c["nccl_buffers_gib"]),
            internode_gbps=float(c["internode_gbps"]), source=g.get("source", ""),
            extra={"calibrated": g["calibrated"]} if g.get("calibrated") else {})
    return out


def names() -> list[str]:
    return list(_table())


def lookup(name: str, table: dict[str, GPUProfile] | None = None) -> GPUProfile:
    """The profile named `name`: exact (case-insensitive), else the one key containing it."""
    table = _table() if table is None else table
    low = name.strip().lower()
    for key, prof in table.items():
        if key.lower() == low or key.lower().replace(" ", "") == low.replace(" ", ""):
            return prof
    hits = [key for key in table if low.replace(" ", "") in key.lower().replace(" ", "")]
    if len(hits) == 1:
        return table[hits[0]]
    why = f"matches {', '.join(hits)}" if hits else "unknown GPU"
    raise UnknownGPU(f"--gpu {name!r}: {why}. Known GPUs: {', '.join(table)} "
                     "(or describe the card with --vram-gb and --tflops)")


def table_text() -> str:
    """`genesis plan --gpu list`: one row per profile."""
    rows = [f"{'GPU':<18} {'VRAM GiB':>8} {'bf16 TF/s':>9} {'mem GB/s':>8}  {'link (GB/s)':<22} source"]
    calibrated = []
    for p in _table().values():
        mark = " *" if p.extra.get("calibrated") else ""
        rows.append(f"{p.name + mark:<18} {p.vram_gib:>8g} {p.bf16_tflops:>9g} {p.mem_gbps:>8g}  "
                    f"{p.link + ' ' + format(p.link_gbps[p.link], 'g'):<22} {p.source}")
        if mark:
            note = p.extra["calibrated"]
            calibrated.append(f"* {p.name}: calibrated (genesis plan calibrate) from {note.get('from', '?')} on "
                              f"{note.get('date', '?')}: matmul {list(p.matmul_efficiency)}, allocator reserve "
                              f"{p.allocator_reserve_fraction:.1%}, CUDA context {p.cuda_context_gib:g} GiB, "
                              f"NCCL {p.nccl_buffers_gib:g} GiB")
    rows += calibrated
    d = next((p for p in _table().values() if not p.extra.get("calibrated")), next(iter(_table().values())))
    rows.append(f"\nefficiencies [pessimistic, optimistic] (every card not marked *): matmul {list(d.matmul_efficiency)}, memory "
                f"{list(d.memory_efficiency)}, link {list(d.link_efficiency)}, overlap {list(d.overlap)}; "
                f"overheads: allocator reserve {d.allocator_reserve_fraction:.0%} of peak, CUDA context "
                f"{d.cuda_context_gib} GiB, NCCL {d.nccl_buffers_gib} GiB (sources: {TABLE.name})")
    return "\n".join(rows)
