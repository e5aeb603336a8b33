"""Genesis: a Llama-style decoder-only transformer, in one file, bottom-up.

RMSNorm -> rotary embedding -> SwiGLU MLP -> grouped-query attention -> decoder
layer -> pretrained base -> model -> causal LM (+ its memory-light loss).

Weight names are Llama's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
Genesis state dict loads into transformers' `LlamaForCausalLM` unchanged and
every Llama tool (vLLM, llama.cpp converters, PEFT) applies; `genesis export
--format llama` writes such a folder. This file holds no training, data or
parallelism code: FSDP, activation checkpointing and compilation are applied
from outside (FSDP auto-wrap finds `GenesisDecoderLayer` through
`_no_split_modules`).
"""

import os
import tempfile
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from .configuration_genesis import GenesisConfig
from .hub import CARD_NAME, push_folder, write_model_card


class GenesisRMSNorm(nn.Module):
    """x / rms(x) * weight, with the reduction in fp32 whatever the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class GenesisRotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE, computed once per forward and shared by every layer."""

    inv_freq: torch.Tensor

    def __init__(self, config: GenesisConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        # Non-persistent: derived from the config, never stored in checkpoints.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: GenesisConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """theta^(-2i/d) for i in [0, d/2): one frequency per rotated pair of dimensions."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 even for bf16 models: position 2047 x freq needs the mantissa. Elementwise
        # ops are not downcast by autocast, so no autocast guard is needed (it costs ~20 us a call).
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(x.device)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd): HF's half-split layout
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate q (B, nh, T, hd) and k (B, nkv, T, hd) by the angles of their positions."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, T, hd) -> (B, 1, T, hd)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class GenesisMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GenesisConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.down_proj.writes_residual = True  # scaled init, see GenesisPreTrainedModel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd): each KV head serves n_rep query heads."""
    batch, n_kv, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, n_kv, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, n_kv * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference attention: softmax(q k^T * scaling + mask) v, written out.

    The fast paths (SDPA, FlashAttention, flex) are looked up in transformers'
    `ALL_ATTENTION_FUNCTIONS` and must agree with this one (tests check it).
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, Tq, Tk)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)  # (B, nh, Tq, hd)
    return attn_output.transpose(1, 2).contiguous(), attn_weights  # (B, Tq, nh, hd)


class GenesisAttention(nn.Module):
    """Grouped-query attention with RoPE: 12 query heads share 6 key/value heads in the 1B model."""

    def __init__(self, config: GenesisConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_key_value_groups
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_out = config.num_attention_heads * self.head_dim
        kv_out = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=config.attention_bias)
        self.o_proj.writes_residual = True  # scaled init, see GenesisPreTrainedModel

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # (B, T)
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nh, T, hd)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nkv, T, hd)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nkv, T, hd)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            # The cache stores rotated keys; returns all keys/values so far, (B, nkv, T_past + T, hd).
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, nh * hd)
        return self.o_proj(attn_output), attn_weights


class GenesisDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). The unit of FSDP wrapping and checkpointing."""

    def __init__(self, config: GenesisConfig, layer_idx: int):
        super().__init__()
        self.self_attn = GenesisAttention(config, layer_idx)
        self.mlp = GenesisMLP(config)
        self.input_layernorm = GenesisRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GenesisRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        # The attention weights are not returned: `output_attentions=True` records them with a hook
        # on GenesisAttention (`_can_record_outputs`), as for every transformers model.
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class GenesisPreTrainedModel(PreTrainedModel):
    """Capabilities as class attributes, read by transformers, Accelerate and TRL.

    Initialisation (`_init_weights`): every Linear and the embedding ~ N(0, 0.02)
    (`initializer_range`), biases 0, RMSNorm weights 1. The two projections that
    write into the residual stream (`o_proj`, `down_proj`) use 0.02 / sqrt(2 x layers),
    as in GPT-2 and OLMo, so the residual's variance does not grow with depth.
    """

    config_class = GenesisConfig
    config: GenesisConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GenesisDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    # What `output_hidden_states` / `output_attentions` collect (transformers' `capture_outputs` hooks):
    # each decoder layer's output and each attention's weights (None from kernels that never form them).
    _can_record_outputs = {"hidden_states": GenesisDecoderLayer, "attentions": GenesisAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and getattr(module, "writes_residual", False):
            std = self.config.initializer_range / (2 * self.config.num_hidden_layers) ** 0.5
            # transformers' `init` helpers skip tensors already loaded from a checkpoint.
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)  # N(0, initializer_range), zeros, ones, RoPE tables

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """transformers' save (safetensors, config with `auto_map`, this code) plus our model card."""
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process and not os.path.exists(os.path.join(save_directory, CARD_NAME)):
            write_model_card(save_directory, self.config)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        **save_kwargs,
    ) -> str:
        """Upload exactly what `save_pretrained` writes, our model card included (token: `HF_TOKEN`)."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            return push_folder(
                folder,
                repo_id,
                private=private,
                revision=revision,
                commit_message=commit_message or "Upload Genesis model",
            )


class GenesisModel(GenesisPreTrainedModel):
    """Embedding -> decoder layers -> final norm; returns the last hidden state (and the KV cache)."""

    def __init__(self, config: GenesisConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(GenesisDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GenesisRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = GenesisRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _position_limit(self) -> int | None:
        """The longest context the config claims, or None where RoPE scaling is configured.

        With scaling (linear, dynamic, YaRN, ...) longer inputs are the point, and transformers treats
        `max_position_embeddings` as informational, so nothing is refused. Without it, positions past
        the trained context give silently wrong outputs: refused, naming the limit. A RoPE config may
        state a longer trained context (`original_max_position_embeddings`); that one counts.
        """
        rope = self.config.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            return None
        return max(self.config.max_position_embeddings, rope.get("original_max_position_embeddings") or 0)

    def _check_inputs(self, input_ids, position_ids, seq_len: int, past_len: int) -> None:
        """Refuse bad inputs before any kernel runs: an out-of-range id on CUDA is a device-side assert.

        The length limit applies to positions: with explicit `position_ids` (packed rows, where
        positions restart at each document) the largest position counts, not the row length.
        Only at inference (eval mode: generation, evaluation): the check reads values on the host,
        a sync that would drain the GPU queue on every training micro-batch and break
        `torch.compile` graphs. Training inputs are checked where they are made instead (the
        pretraining loader's batches, the tokenizer's ids in TRL).
        """
        if self.training or torch.compiler.is_compiling():
            return
        limit = self._position_limit()
        check_positions = limit is not None and position_ids is not None and position_ids.numel() > 0
        stats = []  # gathered into one tensor: a single host sync per forward
        if input_ids is not None and input_ids.numel():
            stats += [input_ids.min(), input_ids.max()]
        if check_positions:
            stats.append(position_ids.max())
        values = torch.stack(stats).tolist() if stats else []
        if input_ids is not None and input_ids.numel():
            lo, hi = values[0], values[1]
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"Token id {bad} is outside the vocabulary [0, {self.config.vocab_size}).")
        if limit is None:
            return
        hint = " Configure RoPE scaling (rope_parameters rope_type 'linear', 'dynamic' or 'yarn') for longer inputs."
        if check_positions:
            if values[-1] >= limit:
                raise ValueError(
                    f"Position {values[-1]} is beyond max_position_embeddings={limit} (positions are 0-based)."
                    + hint
                )
        elif past_len + seq_len > limit:
            raise ValueError(
                f"Sequence of {past_len + seq_len} tokens ({past_len} cached + {seq_len} new) exceeds "
                f"max_position_embeddings={limit}." + hint
            )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        # `output_hidden_states` / `output_attentions` (keyword or config) and `return_dict` are handled by
        # `capture_outputs`: hooks record each layer's output and attention weights into the returned output.
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if use_cache is None:  # a training forward keeps no cache unless asked (it would only cost)
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed layers would append to the cache twice
        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        past_len = cache.get_seq_length() if cache is not None else 0
        self._check_inputs(input_ids, position_ids, seq_len, past_len)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, d)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # Only the caller's position_ids can describe packed rows. Our own arange is one sequence a row,
        # and handing it to the mask builder (or to FlashAttention at batch 1) would only make it check
        # for packing with a `.all()` read on the host: one device sync per training micro-batch.
        packed_position_ids = position_ids
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device)[None]

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=packed_position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                position_ids=packed_position_ids,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of `hidden @ weight.T`, one chunk of tokens at a time.

    Never holds more than (chunk, vocab) logits: each chunk's fp32 logits give the
    loss AND, while they are alive, the gradients (softmax - onehot) w.r.t. hidden
    and weight. So backward costs no recomputation and the (N, vocab) logits of a
    4 x 2048 batch (0.8 GB bf16, 1.6 GB fp32, and as much again for their gradient)
    never exist.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, normaliser: torch.Tensor):
        # hidden (N, d), weight (V, d), labels (N,) with -100 = ignore
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_dh else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]  # (c, d)
            y = labels[start : start + chunk_size]  # (c,)
            logits = (h @ weight.t()).float()  # (c, V), fp32 for the softmax
            valid = y != -100
            target = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            total += ((lse - target_logit) * valid).sum()
            if need_dh or need_dw:
                # d(loss)/d(logits) = (softmax - onehot) / normaliser on valid rows, 0 elsewhere
                grad = logits.sub_(lse[:, None]).exp_()  # reuse the logits' memory
                grad[torch.arange(len(y), device=y.device), target] -= 1.0
                grad *= (valid.float() / normaliser)[:, None]
                grad = grad.to(h.dtype)
                if need_dh:
                    grad_hidden[start : start + chunk_size] = grad @ weight
                if need_dw:
                    grad_weight += (grad.t() @ h).float()
                del grad
            del logits  # before the next chunk's matmul, or two chunks of logits are alive at once
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / normaliser

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None


def _token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N,) fp32 cross-entropy of each row of `hidden @ weight.T` (0 where the target is -100), for
    no-grad callers: one (chunk, vocab) block of fp32 logits at a time, and no gradient buffers."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        y = targets[start : start + chunk_size]  # (c,)
        logits = (hidden[start : start + chunk_size] @ weight.t()).float()  # (c, V)
        target_logit = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
        out[start : start + chunk_size] = (torch.logsumexp(logits, dim=-1) - target_logit) * (y != -100)
        del logits  # before the next chunk's matmul, or two chunks of logits are alive at once
    return out


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy of `hidden_states @ lm_head_weight.T`, without building the logits.

    With `labels` (B, T), position t predicts labels[:, t + 1] (the Llama convention: T - 1
    targets a row). With `shift_labels` (B, T), already aligned, position t predicts
    shift_labels[:, t]: a pretraining window of T + 1 tokens then trains all T targets.
    Equals `F.cross_entropy` on the fp32 logits (mean over non-ignored targets, or sum /
    num_items_in_batch when given, as transformers' Trainer does under gradient accumulation).
    `reduction="none"` returns each target's loss, (B, T) or (B, T - 1), 0 where ignored: what
    evaluation needs for bits per byte. It has no gradient; call it under `torch.no_grad()`.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}.")
    if shift_labels is not None:
        hidden, targets = hidden_states, shift_labels
    elif labels is not None:
        hidden, targets = hidden_states[:, :-1], labels[:, 1:]
    else:
        raise ValueError("causal_lm_loss needs labels or shift_labels.")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match hidden states {tuple(hidden.shape)}."
        )
    if isinstance(lm_head_weight, DTensor):
        # Tensor-parallel head (`_tp_plan`: colwise_gather_output shards the vocabulary): gather the
        # (V, d) weight; its gradient flows back to each rank's shard. The hidden states are replicated.
        lm_head_weight = lm_head_weight.full_tensor()
    target_shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    targets = targets.reshape(-1).to(hidden.device)  # (N,)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    if reduction == "none":
        if needs_grad:  # each token's gradient would need its own logits kept: the memory this file avoids
            raise ValueError("causal_lm_loss(reduction='none') has no gradient: call it under torch.no_grad().")
        return _token_losses(hidden, lm_head_weight, targets, chunk_size).view(target_shape)
    # The normaliser stays a device tensor: reading it on the host would sync every micro-batch.
    if num_items_in_batch is None:
        normaliser = (targets != -100).sum().clamp(min=1).float()
    else:
        normaliser = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    if not needs_grad:  # the autograd function would fill gradient buffers (fp32, vocab x d) for nothing
        return _token_losses(hidden, lm_head_weight, targets, chunk_size).sum() / normaliser
    return _LinearCrossEntropy.apply(hidden, lm_head_weight, targets, chunk_size, normaliser)


class GenesisForCausalLM(GenesisPreTrainedModel, GenerationMixin):
    """Genesis with its tied LM head.

    With `labels` (shifted inside, as in Llama) or `shift_labels` (already aligned with the
    inputs), the loss is computed by `causal_lm_loss` (chunked, never the full fp32 logits)
    and `logits` are NOT returned unless `return_logits=True`: the logits of a
    4 x 2048 x 49,152 batch are most of the memory a training step would otherwise peak at.
    `loss_reduction="none"` (no grad) makes `loss` each target's cross-entropy, (B, T'), as
    evaluation needs for bits per byte, still without the full logits.
    Without labels (inference, generation, TRL's fused head) logits are returned as usual.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: GenesisConfig):
        super().__init__(config)
        self.model = GenesisModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        shift_labels: torch.LongTensor | None = None,
        return_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        loss_reduction: str = "mean",
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, d)
        loss = logits = None
        has_labels = labels is not None or shift_labels is not None
        if has_labels:
            loss = causal_lm_loss(
                hidden_states,
                self.lm_head.weight,
                labels,
                self.config.loss_chunk_size,
                num_items_in_batch,
                shift_labels=shift_labels,
                reduction=loss_reduction,
            )
        if not has_labels or return_logits:
            logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))  # (B, T', V)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# Task heads, transformers' generic ones (as Llama's): a linear layer on the last hidden states.
# `GenesisForSequenceClassification` scores each row's last non-pad token: TRL's RewardTrainer uses it.
class GenesisHeadModel(GenesisPreTrainedModel):
    """Base of the generic heads, which build their backbone with `AutoModel.from_config(config)`.

    That lookup is by config class. Loaded from a saved folder (`trust_remote_code=True`, genesis_hf absent)
    the config's class comes from its own copy of configuration_genesis.py, not this file's import of it:
    register the config's actual class, or the lookup fails ("Unrecognized configuration class").
    """

    def __init__(self, config: GenesisConfig):
        AutoModel.register(type(config), GenesisModel, exist_ok=True)
        super().__init__(config)


class GenesisForSequenceClassification(GenericForSequenceClassification, GenesisHeadModel): ...


class GenesisForTokenClassification(GenericForTokenClassification, GenesisHeadModel): ...


class GenesisForQuestionAnswering(GenericForQuestionAnswering, GenesisHeadModel): ...


__all__ = [
    "GenesisForCausalLM",
    "GenesisForQuestionAnswering",
    "GenesisForSequenceClassification",
    "GenesisForTokenClassification",
    "GenesisModel",
    "GenesisPreTrainedModel",
    "causal_lm_loss",
]
