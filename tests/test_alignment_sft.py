"""SFT data path on TRL: exact assistant-only masking, packing without cross-document attention,
and the same token ids in training as at generation. No training steps here (see test_alignment_train.py)."""

import pytest
import torch
from _alignment_fixtures import DATA_DIR, make_model_folder

from alignment.data import load_sft_dataset
from alignment.generate import load_model_and_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = make_model_folder(tmp_path_factory.mktemp("sft"))
    model, tok = load_model_and_tokenizer(folder, device="cpu")
    return folder, model, tok


def _trainer(folder, model, tok, tmp_path, packing: bool):
    from trl import SFTConfig, SFTTrainer

    ds, _ = load_sft_dataset(str(DATA_DIR / "sft_conversations.jsonl"))
    args = SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, packing=packing, max_length=512,
                     per_device_train_batch_size=1, report_to="none", bf16=False, activation_checkpointing=False,
                     shuffle_dataset=False, seed=0)
    return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok), ds


def _expected_trained(ids: list[int], tok) -> list[bool]:
    """Independent of TRL: a token is trained iff it lies in an assistant turn's content or is its <|im_end|>."""
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    out, i = [False] * len(ids), 0
    while i < len(ids):
        if ids[i] != im_start:
            i += 1
            continue
        j, header = i + 1, ""
        while not header.endswith("\n"):  # "<|im_start|>" ROLE "\n"
            header += tok.decode([ids[j]])
            j += 1
        k = j
        while ids[k] != im_end:
            k += 1
        if header.strip() == "assistant":
            for t in range(j, k + 1):
                out[t] = True
        i = k + 1
    return out


def test_assistant_only_masking_is_exact_token_by_token(base, tmp_path):
    folder, model, tok = base
    trainer, ds = _trainer(folder, model, tok, tmp_path, packing=False)
    checked_multi = checked_tool = False
    for row, source in zip(trainer.train_dataset, ds):
        ids = row["input_ids"]
        # Training ids are exactly the tokenizer's chat template rendering.
        assert ids == tok.apply_chat_template(source["messages"], return_dict=True)["input_ids"]
        labels = trainer.data_collator([row])["labels"][0].tolist()
        expected = _expected_trained(ids, tok)
        for pos, (tid, lab, train) in enumerate(zip(ids, labels, expected)):
            assert lab == (tid if train else -100), f"token {pos} {tok.decode([tid])!r}: label {lab}, trained={train}"
        roles = [m["role"] for m in source["messages"]]
        checked_multi |= roles.count("assistant") > 1
        checked_tool |= "tool" in roles
        assert sum(expected) > 0
    assert checked_multi and checked_tool  # multi-turn and tool turns were covered


def test_training_prefix_equals_generation_prompt(base, tmp_path):
    """What SFT trains after is exactly what generation is given, and the reply ends with <|im_end|>."""
    folder, model, tok = base
    trainer, ds = _trainer(folder, model, tok, tmp_path, packing=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row, source in zip(trainer.train_dataset, ds):
        msgs = source["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = tok.apply_chat_template(msgs[:last], add_generation_prompt=True, return_dict=True)["input_ids"]
        ids = row["input_ids"]
        assert ids[: len(prompt)] == prompt
        labels = trainer.data_collator([row])["labels"][0].tolist()
        reply = [t for t in labels[len(prompt):] if t != -100]
        assert reply[-1] == im_end
        assert tok.decode(reply[:-1]) == msgs[last]["content"]


def test_packing_puts_documents_together_without_cross_attention(base, tmp_path):
    folder, model, tok = base
    trainer, _ = _trainer(folder, model, tok, tmp_path, packing=True)
    unpacked, _ = _trainer(folder, model, tok, tmp_path, packing=False)
    assert len(trainer.train_dataset) < len(unpacked.train_dataset)  # several documents per row
    batch = trainer.data_collator([trainer.train_dataset[0]])
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2
    assert (batch["labels"][0][starts] == -100).all()  # no target across a document boundary
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]  # (T, V)
        bounds = [*starts, pos.numel()]
        for a, b in zip(bounds[:-1], bounds[1:]):
            alone = model(input_ids=batch["input_ids"][:, a:b]).logits[0]  # (b - a, V)
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-4, atol=1e-4)


def test_generation_stops_on_end_of_turn_then_eos(base):
    from alignment.generate import stop_token_ids

    _, _, tok = base
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]


def test_left_padded_batch_generation_matches_one_at_a_time(base):
    """Evaluation and pair sampling batch prompts with left padding: scores must not depend on the batch."""
    _, model, tok = base
    convs = [[{"role": "user", "content": "Why is the sky blue?"}],
             [{"role": "user", "content": "How do I reverse a list in Python? Tell me everything."}]]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"] for c in convs]
    width = max(len(p) for p in prompts)
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=tok.pad_token_id, eos_token_id=[])
    batched = model.generate(input_ids=ids, attention_mask=mask, **kw).scores  # 3 x (2, V)
    for i, p in enumerate(prompts):
        alone = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               **kw).scores
        for step in range(3):
            torch.testing.assert_close(batched[step][i], alone[step][0], rtol=1e-4, atol=1e-4)
