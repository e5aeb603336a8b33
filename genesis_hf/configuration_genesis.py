"""Configuration of Genesis, a Llama-style decoder.

`GenesisConfig()` with no arguments IS Genesis 1B, the model of the seed run
(as `LlamaConfig()` is a Llama): 1,000,441,344 parameters with tied embeddings.
Field names are transformers' own, so the weights and the config map 1:1 onto
`LlamaConfig` / `LlamaForCausalLM` (see `genesis_hf.export`).
"""

from __future__ import annotations

import sys

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

# 500k rather than Llama 2's 10k: slower-rotating low frequencies keep long-range
# positions distinguishable, and it leaves room to extend the context later.
GENESIS_ROPE_THETA = 500_000.0


@strict
class GenesisConfig(PreTrainedConfig):
    r"""Genesis 1B by default.

    | field | 1B value | why |
    | --- | --- | --- |
    | vocab_size | 49,152 | our BPE tokenizer; a multiple of 64 keeps the LM head matmul aligned |
    | hidden_size | 1536 | 12 heads x 128 |
    | intermediate_size | 4736 | SwiGLU, ~3.08 x hidden, a multiple of 64 |
    | num_hidden_layers | 32 | Run 2's deeper, narrower redesign: 3x Run 1's throughput |
    | num_attention_heads / num_key_value_heads | 12 / 6 | GQA halves the KV cache |
    | max_position_embeddings | 2048 | the training sequence length |
    | rope_parameters | theta 500,000 | |
    | tie_word_embeddings | True | the LM head reuses the input embedding |

    Beyond the architecture, `loss_chunk_size` sets how many tokens the training
    loss projects onto the vocabulary at once (see `GenesisForCausalLM.forward`).

    ```python
    >>> from genesis_hf import GenesisConfig, GenesisForCausalLM
    >>> model = GenesisForCausalLM(GenesisConfig())  # Genesis 1B, randomly initialised
    ```
    """

    model_type = "genesis"
    keys_to_ignore_at_inference = ["cache"]
    # Tensor-parallel plan in transformers' vocabulary, so `tp_plan="auto"` works as for Llama.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    default_theta = GENESIS_ROPE_THETA

    vocab_size: int = 49152
    hidden_size: int = 1536
    intermediate_size: int = 4736
    num_hidden_layers: int = 32
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 6
    head_dim: int | None = None  # derived: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    loss_chunk_size: int = 1024

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is None and "rope_theta" not in kwargs and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": GENESIS_ROPE_THETA}
        super().__post_init__(**kwargs)
        # Raise a plain ValueError here, before `@strict` wraps it in its own error type.
        self.validate_architecture()

    def validate_architecture(self):
        """Bad combinations raise `ValueError` with the numbers (also run by `@strict`)."""
        sizes = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "loss_chunk_size": self.loss_chunk_size,
        }
        for name, value in sizes.items():
            if value is None or value <= 0:
                raise ValueError(f"GenesisConfig.{name} must be a positive integer, got {value}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); {self.hidden_size} / {self.num_attention_heads} = "
                f"{self.hidden_size / self.num_attention_heads:g}."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"RoPE rotates pairs of dimensions: head_dim must be even, got {self.head_dim}.")
        theta = (self.rope_parameters or {}).get("rope_theta")
        if theta is not None and theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {theta}.")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        known = ["default", *sorted(ROPE_INIT_FUNCTIONS)]
        if rope_type not in known:  # transformers only logs this; the model would fail at first forward
            raise ValueError(
                f"GenesisConfig.rope_parameters['rope_type'] is {rope_type!r}, which is not a RoPE type "
                f"transformers knows: one of {', '.join(known)}."
            )
        if self.hidden_act != "silu":
            raise ValueError(f"Genesis uses SwiGLU: hidden_act must be 'silu', got {self.hidden_act!r}.")

    @property
    def num_key_value_groups(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self):
        # PEFT reads `model.config.to_dict()` just before it looks up default targets by model_type.
        _register_with_peft()
        return super().to_dict()


def _register_with_peft() -> None:
    """Give "genesis" Llama's PEFT defaults (same module names), so a plain `LoraConfig()` or
    `trl sft --use_peft` targets q_proj and v_proj as for a Llama. This file also ships with the
    weights, so it works under trust_remote_code too. Never imports PEFT: acts once it is loaded."""
    constants = sys.modules.get("peft.utils.constants")
    if constants is None:
        return
    for name, mapping in vars(constants).items():
        if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(mapping, dict) and "llama" in mapping:
            mapping.setdefault(GenesisConfig.model_type, mapping["llama"])


__all__ = ["GenesisConfig"]
