"""Test-only: make Accelerate take its FSDP2 path on CPU (gloo), as it does on GPUs.

Put this folder on PYTHONPATH with GENESIS_TEST_FSDP_ON_CPU=1 (tests/_fsdp_cpu.py does both) and
`accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml ...` runs the real file:
the launcher turns its `fsdp_config` and `mixed_precision` into the FSDP_* / ACCELERATE_* env
vars as usual; every rank then starts Python, which imports this module first.

Accelerate 1.15 honours ACCELERATE_USE_FSDP only for GPU-like devices; on CPU its state becomes
MULTI_CPU (DDP-like). After the original `AcceleratorState.__init__`, we turn MULTI_CPU back into
FSDP with the plugin Accelerate would have built from the same env (or the one passed in), and the
same `set_mixed_precision` call. `prepare()` then wraps with `fully_shard` on gloo.
"""

import os

if os.environ.get("GENESIS_TEST_FSDP_ON_CPU") == "1":
    import accelerate.state as _state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    _original_init = _state.AcceleratorState.__init__

    def _init(self, *args, fsdp_plugin=None, **kwargs):
        _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (self.distributed_type == DistributedType.MULTI_CPU
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
            plugin = fsdp_plugin if fsdp_plugin is not None else FullyShardedDataParallelPlugin()
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            # As Accelerate does at the end of its own __init__: later AcceleratorState() calls copy
            # PartialState's type over ours, and must find FSDP there (not build a new plugin).
            _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    _state.AcceleratorState.__init__ = _init
