"""CUDA checks of the model, skipped (never passed) without a GPU: bf16 SDPA and the fused loss."""

import pytest
import torch
import torch.nn.functional as F
from _model_fixtures import TINY

from genesis_hf import GenesisConfig, GenesisForCausalLM, causal_lm_loss

pytestmark = pytest.mark.gpu


def test_bf16_sdpa_on_cuda_matches_fp32_eager():
    torch.manual_seed(0)
    ref = GenesisForCausalLM(GenesisConfig(**TINY, attn_implementation="eager")).eval()
    fast = GenesisForCausalLM(GenesisConfig(**TINY, attn_implementation="sdpa")).eval()
    fast.load_state_dict(ref.state_dict())
    fast = fast.to("cuda", torch.bfloat16)
    ids = torch.randint(0, TINY["vocab_size"], (2, 48))
    with torch.no_grad():
        a = ref(ids).logits
        b = fast(ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2)


def test_fused_loss_on_cuda_matches_cross_entropy_at_the_1b_vocabulary():
    torch.manual_seed(0)
    hidden = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(49152, 256, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 49152, (2, 512), device="cuda")
    loss = causal_lm_loss(hidden, weight, labels, chunk_size=300)
    ref = F.cross_entropy((hidden[:, :-1] @ weight.t()).float().flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
