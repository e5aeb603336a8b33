"""Reference parity: training/pretrain.py against a plain loop anyone can read.

The same tiny Genesis (same initial weights) trains 30 steps on the same token batches twice:
    1. with our loop (training/pretrain.py main(): loader, accumulation, clipping, LR scheduler, metrics);
    2. with transformers' LlamaForCausalLM holding the same weights, torch AdamW with the same
       parameter groups (decay on >= 2-D weights, none on norms), the same LR function
       (training.schedule.lr_at) and the hand-written loop below.
The per-step losses must agree within 1e-5 (fp32, one process). A pipeline bug (a label shifted
twice, a mask, a schedule off by one, gradients scaled wrongly) makes them drift apart.
"""

from __future__ import annotations

import json

import pytest
import torch
from _pretrain_fixtures import embedded_data  # noqa: F401  (fixture)
from _pretrain_run import DEBUG_RECIPE

STEPS = 30


def _args(out, data):
    from training.args import parse_args

    tok_dir, data_dir = data
    return parse_args(["--config", str(DEBUG_RECIPE), "--output_dir", str(out), "--embedded_data", "",
                       "--tokenizer_dir", str(tok_dir), "--data_dir", str(data_dir), "--resume", "",
                       "--max_steps", str(STEPS), "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "0",
                       "--save_minutes", "0", "--no_progress_bar"])


def _reference_losses(args, bug: str | None = None) -> list[float]:
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, LlamaForCausalLM

    from genesis_hf.export import genesis_to_llama_config
    from training.data.loader import PackedLoader
    from training.run_setup import build_model
    from training.schedule import lr_at

    set_seed(args.seed)  # what the loop does before it builds its model: the same initial weights
    genesis = build_model(args, AutoTokenizer.from_pretrained(args.tokenizer_dir))
    model = LlamaForCausalLM(genesis_to_llama_config(genesis.config))
    model.load_state_dict(genesis.state_dict(), strict=True)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]  # parameters() lists the tied embedding once
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    loader = PackedLoader(args.data_dir, seq_len=args.seq_len, micro_batch_size=args.per_device_train_batch_size,
                          seed=args.seed)
    accum, losses = args.gradient_accumulation_steps, []
    for step in range(STEPS):
        lr_step = step + 1 if bug == "lr_off_by_one" else step
        for group in opt.param_groups:
            group["lr"] = lr_at(lr_step, max_lr=args.learning_rate, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                                max_steps=STEPS, kind=args.lr_scheduler_type)
        total = 0.0
        for _ in range(accum):
            batch = loader.next_batch()  # (B, T+1)
            logits = model(input_ids=batch[:, :-1]).logits.float()  # (B, T, V)
            targets = batch[:, 1:] if bug != "labels_shifted_twice" else batch[:, 2:]  # (B, T) / (B, T-1)
            logits = logits if bug != "labels_shifted_twice" else logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            (loss / accum).backward()
            total += loss.item() / accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory, embedded_data):  # noqa: F811
    args = _args(tmp_path_factory.mktemp("ref") / "unused", embedded_data)
    return args, _reference_losses(args)


def test_our_loop_matches_a_plain_llama_loop(tmp_path, embedded_data, reference):  # noqa: F811
    from training import pretrain

    args = _args(tmp_path / "run", embedded_data)
    assert args.gradient_accumulation_steps > 1 and args.max_grad_norm > 0  # both paths are exercised
    assert pretrain.main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("event") is None}
    assert sorted(ours) == list(range(1, STEPS + 1))
    ref = reference[1]
    diffs = [abs(ours[s + 1] - ref[s]) for s in range(STEPS)]
    assert max(diffs) < 1e-5, f"per-step |ours - reference| up to {max(diffs):.2e} (first at step {diffs.index(max(diffs)) + 1})"
    assert ref[-1] < ref[0] - 0.5  # it learned: the comparison is not between two flat lines


@pytest.mark.parametrize("bug", ["lr_off_by_one", "labels_shifted_twice"])
def test_the_comparison_catches_a_pipeline_bug(reference, bug):
    """The same reference with one small pipeline bug is far outside the tolerance: the check can fail."""
    args, good = reference
    bad = _reference_losses(args, bug)
    assert max(abs(a - b) for a, b in zip(good, bad)) > 1e-3
