"""Trace training steps of Genesis on fake tensors and a fake process group: memory, FLOPs, bytes.

Nothing is allocated: the model is built on "meta", wrapped exactly as `accelerator.prepare` wraps
it for pretrain.py (fp32 master weights, activation checkpointing per decoder layer, then
`fully_shard` per decoder layer and at the root with `genesis_policy`), materialised with
`to_empty` inside a FakeTensorMode, and run under PyTorch's FSDPMemTracker with a process group of
backend "fake" of the run's world size. A second dispatch mode counts FLOPs (the formulas of
torch.utils.flop_counter, what FlopCounterMode uses) and bytes read and written per kernel, and the
all-gather / reduce-scatter bytes.

Each optimizer step runs `gradient_accumulation_steps` micro-batches in pretrain.py; the trace runs
the three kinds that differ (an accumulating micro-batch under no_sync, the last micro-batch that
reduce-scatters, the optimizer step) twice, and reports the second step: the first one creates
the AdamW moments, so its optimizer-step peak is not the steady state.

Every decoder layer is the same FSDP unit, so each quantity (bytes by category, FLOPs, bytes moved,
collective bytes) is affine in the number of layers: the trace runs the model at 2 and 3 layers and
extrapolates to the recipe's depth (exact; tests/test_plan.py checks it against a deeper trace).
A 1B trace at full depth takes minutes on 2 cores; two shallow ones take seconds.

DTensor sharding propagation asks `detect_fake_mode` for a fake mode and, under ours, would run
its global-shape scratch tensors in it, where the tracker charges them (a 1B trace read 21 GiB
of optimizer step for about 10). It gets None and builds its own private mode instead.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# FSDPMemTracker categories -> the planner's
CATEGORIES = {
    "Sharded Param": "params_sharded", "Unsharded Param": "params_unsharded", "All Gather": "params_unsharded",
    "Buffer": "buffers", "Sharded Grad": "grads", "Unsharded Grad": "grads", "Reduce Scatter": "grads",
    # "Inputs": the trace never calls track_inputs; it files DPO's reference shards under it (`trace_model`)
    "OptState": "optimizer", "Activation": "activations", "Inputs": "reference", "Temp": "temporary",
    "Parameter": "params_sharded", "Gradient": "grads", "Optstate": "optimizer", "Other": "temporary",
}
KEYS = ("params_sharded", "params_unsharded", "buffers", "grads", "optimizer", "activations", "temporary", "loss",
        "reference")
SEGMENTS = ("accumulate", "last_micro_batch", "optimizer_step")


@dataclass(frozen=True)
class Setting:
    """What one launch runs: the recipe's batch, the accelerate config's sharding, the choices."""

    micro_batch: int
    grad_accum: int
    seq_len: int
    world_size: int
    activation_checkpointing: str = "full"  # full | alternate | none
    reshard_after_forward: bool = True
    save_mode: str = "async"
    mixed_precision: str = "bf16"
    fsdp: bool = True  # distributed_type FSDP; False: one process, autocast (single_gpu.yaml)
    # What trains: pretrain.py, or TRL's SFTTrainer / DPOTrainer as alignment/sft.py and dpo.py run them.
    workload: str = "pretrain"  # pretrain | sft | dpo
    # The policy's parameter dtype: Accelerate's FSDP2 upcasts a bf16 checkpoint to fp32 master weights
    # (fsdp_utils.py `fsdp2_prepare_model`); one process with `dtype: bfloat16` trains in bf16.
    param_dtype: str = "float32"
    reference: bool = False  # DPO: a frozen reference model runs beside the policy (bf16, sharded per layer)

    @property
    def sequences_per_micro_batch(self) -> int:
        """Rows of one micro-batch: DPO concatenates each pair's chosen and rejected answers."""
        return self.micro_batch * (2 if self.workload == "dpo" else 1)

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_micro_batch * self.grad_accum * self.seq_len * self.world_size


@dataclass
class SegmentTrace:
    """One traced segment: its peak by category (bytes), the loss's own peak, kernels and collectives."""

    peak: dict[str, int] = field(default_factory=dict)
    peak_total: int = 0
    loss_bytes: int = 0
    # Memory by category at every module hook (before/after pre/post forward/backward) and each
    # module's own peak, keyed by (module with the layer index as first/middle/last, state, call).
    # Each is affine in the number of layers; the segment's peak is the largest of them.
    candidates: dict[tuple, dict[str, int]] = field(default_factory=dict)
    flops: list[float] = field(default_factory=list)  # per kernel
    bytes: list[float] = field(default_factory=list)  # per kernel, read + written
    allgather_bytes: int = 0  # full (unsharded) size of every all-gather output
    reduce_scatter_bytes: int = 0  # full size of every reduce-scatter input
    phase: str = ""


@dataclass
class Trace:
    num_layers: int
    segments: dict[str, SegmentTrace]
    steady: dict[str, int]  # bytes by category after the step (what stays: params, optimizer)
    reference_bytes: int = 0  # DPO: the reference model's parameter shards on this rank (category "reference")


# The per-token fields TRL's trainers ask of the fused LM head (trl/trainer/sft_trainer.py and
# dpo_trainer.py, `add_fused_lm_head(..., outputs=...)`); the reference model gets the default.
FUSED_OUTPUTS = {"sft": ("log_probs", "entropy", "is_top1"), "dpo": ("log_probs", "entropy", "mean_logits", "is_top1")}


class _Counter(TorchDispatchMode):
    """FLOPs and bytes of every kernel, and collective bytes, into `self.seg` (a SegmentTrace)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.seg: SegmentTrace | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor desugar into local ops first (as the tracker does)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seg = self.seg
        if seg is None:
            return out
        name = func.__name__
        if func.namespace in ("c10d", "_c10d_functional") and ("allgather" in name or "all_gather" in name):
            seg.allgather_bytes += _nbytes(args[0])
        elif func.namespace in ("c10d", "_c10d_functional") and "reduce_scatter" in name:
            seg.reduce_scatter_bytes += _nbytes(args[1]) if len(args) > 1 else 0
        elif not func.is_view and func.namespace == "aten":
            packet = func._overloadpacket
            if packet in self.registry:
                flops = self.registry[packet](*args, **kwargs, out_val=out)
            elif "scaled_dot_product" in name and "for_cpu" in name:
                flops = _cpu_sdpa_flops(name, args, kwargs)
            else:
                flops = 0
            seg.flops.append(float(flops))
            seg.bytes.append(float(_tree_bytes(args) + _tree_bytes(kwargs) + _tree_bytes(out)))
        return out


def _cpu_sdpa_flops(name: str, args, kwargs) -> float:
    """The CPU trace runs SDPA as `_scaled_dot_product_flash_attention_for_cpu` (and its backward),
    which flop_counter does not know; a GPU runs a flash kernel of the same work. Forward: two
    matmuls, 4 b h s_q s_k d; backward: twice that (flop_counter's rule for flash). Causal: the
    kernel skips the masked half of the blocks."""
    backward = "backward" in name
    q, k = (args[1], args[2]) if backward else (args[0], args[1])
    b, h, s_q, d = q.shape
    s_k = k.shape[-2]
    flops = 4.0 * b * h * s_q * s_k * d * (2 if backward else 1)
    causal = args[7] if backward and len(args) > 7 else (args[4] if not backward and len(args) > 4 else kwargs.get("is_causal", False))
    return flops / 2 if causal else flops


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _tree_bytes(obj) -> int:
    from torch.utils._pytree import tree_leaves

    return sum(t.numel() * t.element_size() for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


def build_wrapped_model(config, setting: Setting, mesh):
    """The model as `accelerator.prepare` hands it to pretrain.py, on meta (nothing allocated)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from genesis_hf import GenesisForCausalLM
    from training.fsdp import genesis_policy

    with torch.device("meta"):
        model = GenesisForCausalLM(config).to(getattr(torch, setting.param_dtype))  # fp32: Accelerate's upcast
    if setting.workload in FUSED_OUTPUTS:  # TRL patches the forward in the trainer's __init__, before prepare
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=FUSED_OUTPUTS[setting.workload])
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if setting.activation_checkpointing == "full" or (setting.activation_checkpointing == "alternate" and i % 2 == 0):
            layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)  # Accelerate's fsdp2_apply_ac
    if setting.fsdp:
        from torch.distributed.fsdp import fully_shard

        policy = genesis_policy(setting.mixed_precision)
        for layer in layers:  # TRANSFORMER_BASED_WRAP on GenesisDecoderLayer: the wrapper is the unit
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=setting.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=setting.reshard_after_forward)
    return model


def build_reference(config, setting: Setting, mesh):
    """DPO's reference model as alignment/dpo.py holds it: loaded in bf16, frozen, `fully_shard` per decoder
    layer and at the root with the policy's precision policy, resharded after every forward
    (`shard_reference`), in eval mode, with TRL's fused LM head (log-probs only)."""
    from trl.trainer.utils import add_fused_lm_head

    from genesis_hf import GenesisForCausalLM
    from training.fsdp import genesis_policy

    with torch.device("meta"):
        ref = GenesisForCausalLM(config).to(torch.bfloat16)
    ref.requires_grad_(False)
    if setting.fsdp:
        from torch.distributed.fsdp import fully_shard

        policy = genesis_policy(setting.mixed_precision)
        for layer in ref.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(ref, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    ref.eval()
    add_fused_lm_head(ref)
    return ref


def _local_bytes(module) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in module.parameters())


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A process group of backend "fake" (every collective returns at once) and a CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("genesis plan: a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def _private_dtensor_fake_mode():
    """DTensor propagation must not reuse the trace's fake mode (module docstring)."""
    import torch.distributed.tensor._sharding_prop as sharding_prop

    return mock.patch.object(sharding_prop, "detect_fake_mode", lambda *a, **k: None)


def trace_model(config, setting: Setting, num_layers: int, *, private_mode: bool = True, fake: bool = True) -> Trace:
    """Two optimizer steps of `config` cut to `num_layers` layers; the second step is reported.
    fake=False runs the same steps for real in an already initialised process group (the
    calibration test: gloo ranks on CPU, the same tracker, real tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import genesis_hf.modeling_genesis as modeling

    cfg = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": num_layers})
    with contextlib.ExitStack() as stack:
        if not fake:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (dist.get_world_size(),)) if setting.fsdp else None
        else:
            mesh = stack.enter_context(fake_process_group(setting.world_size)) if setting.fsdp else None
        model = build_wrapped_model(cfg, setting, mesh)
        ref = build_reference(cfg, setting, mesh) if setting.reference else None
        if fake and private_mode:
            stack.enter_context(_private_dtensor_fake_mode())
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        model.to_empty(device="cpu")
        if ref is not None:
            ref.to_empty(device="cpu")
        if not fake:
            with torch.no_grad():
                for p in [*model.parameters(), *(ref.parameters() if ref is not None else [])]:
                    p.normal_(0.0, 0.02)  # real values: the memory does not depend on them
        if not setting.fsdp:  # to_empty replaces each module's tensor: tie the head to the embedding again
            model.tie_weights()
            if ref is not None:
                ref.tie_weights()
        model.train()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                      lr=1e-4, betas=(0.9, 0.95), foreach=True)  # CUDA's default
        tracker = _make_tracker(model, optimizer, setting)
        if ref is not None and setting.fsdp:
            # FSDPMemTracker instruments one root. The reference's shards are filed by hand, after its
            # lazy init (which re-pads shards that `to_empty` replaced: on fake tensors that allocates,
            # and would be charged to its first forward as activations), under a category the trace
            # does not otherwise use.
            from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType

            ref._get_fsdp_state()._lazy_init()
            for p in ref.parameters():
                tracker._update_and_maybe_create_winfos(p.to_local(), _FSDPRefType.INP)
        elif ref is not None:
            # MemTracker's forward hook puts a gradient hook on every parameter it meets, which a frozen
            # one refuses; the reference only runs under no_grad, so asking for grads changes nothing.
            ref.requires_grad_(True)
            tracker.track_external(ref)
        counter = _Counter()
        loss_peak = [0]
        loss_calls = {"forward": 0, "backward": 0}  # per segment: DPO runs the fused head twice (policy, reference)

        def measured(real, when: str = "forward"):
            """`real` (the loss: our chunked loss, or TRL's fused log-prob head, forward or backward) with
            its own peak above what was live before it recorded as the "loss" category of a candidate:
            no module hook sees inside it, and the head's backward runs before any layer's."""
            def wrapper(*args, **kwargs):
                before = _tracker_total(tracker)
                at_start = _categories(tracker.get_tracker_snapshot("current"))
                saved = (dict(tracker._peak_mem), dict(tracker._peak_mem_snap))
                _restart_peak(tracker)
                out = real(*args, **kwargs)
                own = max(tracker._peak_mem.values(), default=0) - before
                loss_peak[0] = max(loss_peak[0], own)
                if counter.seg is not None:
                    counter.seg.candidates[("loss", when, loss_calls[when])] = {**at_start, "loss": own}
                    loss_calls[when] += 1
                if max(saved[0].values(), default=0) > max(tracker._peak_mem.values(), default=0):
                    tracker._peak_mem, tracker._peak_mem_snap = saved
                return out
            return wrapper

        if ref is not None:  # its eval-mode input check reads ids on the host: no device memory, no fake values
            stack.enter_context(mock.patch.object(modeling.GenesisModel, "_check_inputs", lambda *a, **k: None))
        if setting.workload in FUSED_OUTPUTS:
            import trl.kernels.chunked_logprob as chunked
            import trl.trainer.utils as trl_utils

            # On CUDA each logits tile is folded by a Triton kernel that works in registers (it reads the
            # tile once; the backward rewrites it in place); this CPU trace would run TRL's torch fallback,
            # whose fp32 temporaries (several [4096 x 32768] tiles) a GPU never allocates. Trace the GPU's.
            def fold(passes: int):
                def kernel(tile, *args, **kwargs):
                    if counter.seg is not None:
                        counter.seg.flops.append(0.0)
                        counter.seg.bytes.append(float(passes * tile.numel() * tile.element_size()))
                return kernel

            stack.enter_context(mock.patch.object(chunked, "_forward_tile", fold(1)))
            stack.enter_context(mock.patch.object(chunked, "_backward_tile", fold(2)))

            fused = trl_utils._ChunkedLogProbFunction
            stack.enter_context(mock.patch.object(trl_utils, "_ChunkedLogProbFunction",
                                                  type("Measured", (), {"apply": staticmethod(measured(fused.apply))})))
            # autograd looks the backward up on the class when it runs
            stack.enter_context(mock.patch.object(fused, "backward", staticmethod(measured(fused.backward, "backward"))))
        else:
            stack.enter_context(mock.patch.object(modeling, "causal_lm_loss", measured(modeling.causal_lm_loss)))
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if not setting.fsdp and setting.mixed_precision == "bf16"
                    else contextlib.nullcontext())
        segments: dict[str, SegmentTrace] = {}
        stack.enter_context(tracker)
        stack.enter_context(counter)
        kinds = (["accumulate"] if setting.grad_accum > 1 else []) + ["last_micro_batch"]
        for _step in range(2):
            segments = {}
            for kind in kinds:
                seg = counter.seg = segments[kind] = SegmentTrace()
                _restart_peak(tracker)
                tracker.reset_mod_stats()
                loss_peak[0] = loss_calls["forward"] = loss_calls["backward"] = 0
                if setting.fsdp:
                    model.set_requires_gradient_sync(kind == "last_micro_batch")  # accelerator.no_sync
                x = torch.randint(0, cfg.vocab_size, (setting.sequences_per_micro_batch, setting.seq_len))
                with autocast:
                    loss = _micro_batch_loss(setting, model, ref, x)
                (loss / setting.grad_accum).backward()
                _close(seg, tracker, num_layers)
                seg.loss_bytes = loss_peak[0]
            seg = counter.seg = segments["optimizer_step"] = SegmentTrace()
            _restart_peak(tracker)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _close(seg, tracker, num_layers)
            seg.candidates = {("optimizer step", "peak", 0): dict(seg.peak)}
            seg.phase = "optimizer step"
        counter.seg = None
        steady = _categories(tracker.get_tracker_snapshot("current"))
        reference_bytes = _local_bytes(ref) if ref is not None else 0
    if reference_bytes and not setting.fsdp:
        # One process: MemTracker files the reference's weights with the policy's parameters. They are
        # live throughout the reported step: move them to their own category everywhere.
        for cats in [steady, *(c for seg in segments.values() for c in [seg.peak, *seg.candidates.values()])]:
            moved = min(reference_bytes, cats.get("params_sharded", 0))
            cats["params_sharded"] -= moved
            cats["reference"] = cats.get("reference", 0) + moved
    return Trace(num_layers=num_layers, segments=segments, steady=steady, reference_bytes=reference_bytes)


def _micro_batch_loss(setting: Setting, model, ref, x):
    """One micro-batch's loss, computed as the trainer that runs `setting.workload` computes it.

    pretrain: pretrain.py's call (our chunked loss on pre-shifted labels).
    sft: SFTTrainer.compute_loss (TRL 1.16): the fused LM head's per-token log-probs, summed over the
      tokens with labels, with its entropy and top-1 metrics. A packed row is traced as a row of
      max_length with causal attention (the labels are all kept: assistant-only masking only removes
      rows from the head's work, so this is the upper bound).
    dpo: DPOTrainer._compute_loss: chosen and rejected rows in one forward through the fused head,
      then the reference's forward under no_grad on the same rows, then the sigmoid loss on the
      log-ratio margins plus the SFT (RPO) term on the chosen rows."""
    if setting.workload == "pretrain":
        return model(input_ids=x, shift_labels=x).loss
    out = model(input_ids=x, labels=x, fused_lm_head=True, use_cache=False)
    if setting.workload == "sft":
        loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
        out.entropy.detach().sum()
        out.is_top1.sum()
        return loss
    import torch.nn.functional as F

    logps = out.log_probs.sum(dim=1)
    if ref is not None:
        with torch.no_grad():
            ref_logps = ref(input_ids=x, labels=x, fused_lm_head=True, use_cache=False).log_probs.sum(dim=1)
    else:  # precompute_ref_log_probs: the reference's numbers come with the batch
        ref_logps = torch.zeros_like(logps)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    n_chosen = out.label_mask.chunk(2)[0].sum(dim=1).clamp(min=1)
    out.entropy.detach().sum()
    return -F.logsigmoid(0.1 * margin).mean() + (-chosen / n_chosen).mean()


def _make_tracker(model, optimizer, setting: Setting):
    if setting.fsdp:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        return FSDPMemTracker(model, optimizer)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    return tracker


def _restart_peak(tracker) -> None:
    """Start a new peak from what is live now (MemTracker keeps one peak for its whole life)."""
    tracker._peak_mem_snap = tracker.get_tracker_snapshot("current")
    tracker._peak_mem = {dev: snap["Total"] for dev, snap in tracker._peak_mem_snap.items()}


def _tracker_total(tracker) -> int:
    return sum(snap.get("Total", 0) for snap in tracker.get_tracker_snapshot("current").values())


def _categories(snapshot) -> dict[str, int]:
    out = dict.fromkeys(KEYS, 0)
    for dev_snap in snapshot.values():
        for key, value in dev_snap.items():
            name = getattr(key, "value", key)
            if name != "Total":
                out[CATEGORIES.get(name, "temporary")] += int(value)
    return out


_LAYER = re.compile(r"\.layers\.(\d+)")


def _close(seg: SegmentTrace, tracker, num_layers: int) -> None:
    seg.peak = _categories(tracker.get_tracker_snapshot("peak"))
    seg.peak_total = sum(seg.peak.values())
    for stats in tracker.memory_tracking.values():
        fqn = stats.mod_fqn
        match = _LAYER.search(fqn)
        if match:
            i = int(match.group(1))
            where = "first" if i == 0 else "last" if i == num_layers - 1 else "middle"
            if where == "middle":
                continue  # an interior layer never holds the extreme: memory is affine in its index
            fqn = fqn[:match.start()] + f".layers.{where}" + fqn[match.end():]
        encloses_layers = not match and any(
            _LAYER.search(other.mod_fqn) and other.mod_fqn.startswith(stats.mod_fqn + ".")
            for other in tracker.memory_tracking.values())
        for state, snaps in stats.snapshots.items():
            name = getattr(state, "value", str(state))
            if encloses_layers and "Peak" in name:
                continue  # a peak over all layers is a max, not affine in their number
            for k, snap in enumerate(snaps):
                seg.candidates[(fqn, name, k)] = _categories(snap)


def extrapolate(a: Trace, b: Trace, num_layers: int) -> dict:
    """Per segment at `num_layers`: the peak by category (the largest extrapolated candidate), where
    it falls, the loss's bytes and the collective bytes, each affine from traces a and b.
    FLOP/byte lists stay per trace (the time model extrapolates its sums)."""
    span = b.num_layers - a.num_layers

    def lin(x, y):
        return int(round(x + (y - x) * (num_layers - a.num_layers) / span))

    out = {}
    for name, sa in a.segments.items():
        sb = b.segments[name]
        best, where = None, ""
        for key in sa.candidates.keys() & sb.candidates.keys():
            cats = {k: lin(sa.candidates[key].get(k, 0), sb.candidates[key].get(k, 0)) for k in KEYS}
            if best is None or sum(cats.values()) > sum(best.values()):
                best, where = cats, key
        # At the traced depth the candidates must reach the tracker's own peak (else a peak fell
        # between hooks, and the extrapolation would undercount): then use the tracker's peak.
        reached = max((sum(c.values()) for c in sb.candidates.values()), default=0)
        if best is None or reached < sb.peak_total:
            best = {k: lin(sa.peak.get(k, 0), sb.peak.get(k, 0)) for k in KEYS}
            where = ("segment peak",)
        out[name] = {"peak": best, "peak_total": sum(best.values()), "loss_bytes": lin(sa.loss_bytes, sb.loss_bytes),
                     "allgather_bytes": lin(sa.allgather_bytes, sb.allgather_bytes),
                     "reduce_scatter_bytes": lin(sa.reduce_scatter_bytes, sb.reduce_scatter_bytes),
                     "phase": _phase_name(name, where), "kernels": (sa, sb)}
    out["_steady"] = {k: lin(a.steady[k], b.steady[k]) for k in KEYS}
    out["_reference_bytes"] = lin(a.reference_bytes, b.reference_bytes)
    out["_layers"] = (a.num_layers, b.num_layers, num_layers)
    return out


def _phase_name(segment: str, key: tuple) -> str:
    seg = {"accumulate": "accumulating micro-batch", "last_micro_batch": "last micro-batch",
           "optimizer_step": "optimizer step"}[segment]
    if segment == "optimizer_step":
        return seg
    what = key[0]
    if what == "loss":
        if key[1] == "backward":
            return f"{seg}, backward: the LM head's log-prob gradients"
        return f"{seg}, forward: " + ("the reference model's log-probs" if key[2] == 1 else "the loss")
    state = key[1] if len(key) > 1 else ""
    direction = "backward" if "Backward" in state or "BW" in state else "forward"
    short = what.replace("._checkpoint_wrapped_module", "").split(".", 1)[-1] if "." in what else what
    return f"{seg}, {direction}: {short} ({state})"
