"""GenesisConfig and GenesisForCausalLM on CPU: sizes, validation, loss, attention paths, cache, checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from _model_fixtures import TINY

from genesis_hf import GenesisConfig, GenesisForCausalLM, causal_lm_loss


def tiny_model(**overrides) -> GenesisForCausalLM:
    torch.manual_seed(0)
    return GenesisForCausalLM(GenesisConfig(**{**TINY, **overrides})).eval()


def test_default_config_is_genesis_1b():
    config = GenesisConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (1536, 32, 4736)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (12, 6, 128)
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 2048)
    assert config.rope_parameters["rope_theta"] == 500_000.0
    assert config.tie_word_embeddings
    with torch.device("meta"):
        model = GenesisForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 1_000_441_344
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=1000), "hidden_size (1000) must be divisible by num_attention_heads (12)"),
        (
            dict(num_key_value_heads=5),
            "num_attention_heads (12) must be divisible by num_key_value_heads (5)",
        ),
        (dict(hidden_size=36, num_attention_heads=12, num_key_value_heads=6), "head_dim must be even, got 3"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer, got 0"),
        (dict(vocab_size=-1), "vocab_size must be a positive integer, got -1"),
        (dict(rope_theta=-5.0), "rope_theta must be positive, got -5.0"),
    ],
)
def test_bad_config_raises_value_error_with_numbers(kwargs, message):
    with pytest.raises(ValueError) as err:
        GenesisConfig(**kwargs)
    assert message in str(err.value)


def test_rope_theta_is_configurable_and_round_trips(tmp_path):
    config = GenesisConfig(**TINY, rope_theta=10_000.0)
    config.save_pretrained(tmp_path)
    assert GenesisConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 10_000.0


def test_bad_inputs_fail_before_any_kernel():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"Token id 256 is outside the vocabulary \[0, 256\)"):
        model(torch.tensor([[1, 2, 256]]))
    with pytest.raises(ValueError, match=r"Token id -3 is outside the vocabulary"):
        model(torch.tensor([[1, -3]]))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="Position 64 is beyond max_position_embeddings=64"):
        model(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.tensor([[62, 63, 64]]))


def test_packed_rows_longer_than_the_context_are_fine_when_positions_restart():
    model = tiny_model()
    # Two 40-token documents packed into one 80-token row (TRL's padding-free packing).
    position_ids = torch.cat([torch.arange(40), torch.arange(40)])[None]
    ids = torch.randint(0, 256, (1, 80))
    with torch.no_grad():
        out = model(ids, position_ids=position_ids)
    assert out.logits.shape == (1, 80, 256)


def test_loss_equals_plain_cross_entropy_values_and_gradients():
    model = tiny_model(loss_chunk_size=7)  # a chunk size that does not divide the token count
    ids = torch.randint(0, 256, (3, 20))
    labels = ids.clone()
    labels[0, :5] = -100  # prompt masking
    labels[2, 10:] = -100

    loss = model(ids, labels=labels).loss
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(ids).logits.float()
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_shift_labels_train_every_position_of_a_window():
    model = tiny_model()
    window = torch.randint(0, 256, (2, 17))  # a pretraining row: T + 1 tokens
    x, y = window[:, :-1], window[:, 1:]
    with torch.no_grad():
        loss = model(x, shift_labels=y).loss
        logits = model(x).logits.float()
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # all 16 targets, none dropped
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        model(x, shift_labels=y[:, :-1])


def test_loss_with_num_items_in_batch_is_a_sum_over_that_count():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        mean = model(ids, labels=ids).loss
        summed = model(ids, labels=ids, num_items_in_batch=100).loss
    n_tokens = 2 * 11
    torch.testing.assert_close(summed * 100, mean * n_tokens)


def test_per_token_losses_equal_cross_entropy_without_reduction():
    """loss_reduction="none": each target's loss (validation's bits per byte needs them), 0 where ignored."""
    model = tiny_model(loss_chunk_size=7)
    ids = torch.randint(0, 256, (3, 20))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
        per_token = model(ids, labels=labels, loss_reduction="none", use_cache=False).loss  # (B, T - 1)
        shifted = model(ids[:, :-1], shift_labels=ids[:, 1:], loss_reduction="none", use_cache=False).loss
    ref = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")  # 0 where ignored
    torch.testing.assert_close(per_token, ref, rtol=1e-6, atol=1e-6)
    ref = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(shifted, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no gradient: call it under torch.no_grad"):
        model(ids, labels=labels, loss_reduction="none")
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none', not 'sum'"):
        model(ids, labels=labels, loss_reduction="sum")


def test_loss_never_builds_full_logits_unless_asked():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 12))
    assert model(ids, labels=ids).logits is None
    out = model(ids, labels=ids, return_logits=True)
    assert out.logits.shape == (2, 12, 256)


def test_chunked_loss_holds_one_chunk_of_logits_at_a_time():
    """Peak memory of the loss, training (with its two gradient buffers) and per-token (no grad), in
    chunks of fp32 logits: about 1.3-1.5. A chunk's logits kept alive into the next chunk's matmul
    made it 2.3 (measured on CPU by MemTracker, which follows every tensor storage an op creates)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    def peak(fn) -> int:
        with MemTracker() as tracker:
            fn()
            return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    torch.manual_seed(0)
    hidden = torch.randn(1, 1024, 32, requires_grad=True)
    weight = torch.randn(8192, 32, requires_grad=True)
    y = torch.randint(0, 8192, (1, 1024))
    chunk = 128 * 8192 * 4  # bytes of one (128, V) fp32 chunk
    grad_buffers = (hidden.numel() + weight.numel()) * 4
    train = peak(lambda: causal_lm_loss(hidden, weight, shift_labels=y, chunk_size=128)) - grad_buffers
    with torch.no_grad():
        per_token = peak(lambda: causal_lm_loss(hidden, weight, shift_labels=y, chunk_size=128, reduction="none"))
    assert train < 1.75 * chunk and per_token < 1.75 * chunk, (train / chunk, per_token / chunk)


def test_causal_lm_loss_function_matches_reference_in_bf16_tolerance():
    torch.manual_seed(1)
    hidden = torch.randn(2, 33, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1000, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 33))
    loss = causal_lm_loss(hidden, weight, labels, chunk_size=10)
    ref = F.cross_entropy((hidden[:, :-1] @ weight.t()).float().flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_sdpa_matches_eager_reference():
    ids = torch.randint(0, 256, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    eager = tiny_model(attn_implementation="eager")
    sdpa = tiny_model(attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = sdpa(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_full_recompute():
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        nocache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
        assert torch.equal(out, nocache)
        # The last generated token is the argmax of a full forward over everything before it.
        logits = model(out[:, :-1]).logits[:, -1]
    assert torch.equal(logits.argmax(-1), out[:, -1])


def test_sampling_and_beam_search_generate():
    model = tiny_model()
    prompt = torch.randint(0, 256, (1, 4))
    torch.manual_seed(3)
    a = model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9)
    torch.manual_seed(3)
    b = model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9)
    assert torch.equal(a, b) and a.shape == (1, 12)
    beams = model.generate(prompt, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (2, 12)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 256, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_no_split_modules_name_the_decoder_layer():
    model = tiny_model()
    names = {type(m).__name__ for m in model.modules()}
    assert set(model._no_split_modules) == {"GenesisDecoderLayer"}
    assert "GenesisDecoderLayer" in names


def test_initialisation_is_documented_scheme():
    model = GenesisForCausalLM(GenesisConfig(**{**TINY, "hidden_size": 256, "intermediate_size": 512}))
    std = model.config.initializer_range
    layers = model.config.num_hidden_layers
    q = model.model.layers[0].self_attn.q_proj.weight
    o = model.model.layers[0].self_attn.o_proj.weight
    down = model.model.layers[1].mlp.down_proj.weight
    assert abs(q.std().item() - std) < 0.1 * std
    assert abs(o.std().item() - std / (2 * layers) ** 0.5) < 0.1 * std
    assert abs(down.std().item() - std / (2 * layers) ** 0.5) < 0.1 * std
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
