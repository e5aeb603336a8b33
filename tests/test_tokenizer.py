"""The Genesis tokenizer: exact size, stable ids, lossless round trips, ChatML template, fingerprint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _data_fixtures import FIXTURES, embedded, write_jsonl  # noqa: F401  (fixture)

from genesis_hf.tokenizer import (
    BYTE_TOKENS,
    CHAT_STOP_TOKENS,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    cli_main,
    token_bytes,
    tokenizer_fingerprint,
    train_tokenizer,
)
from training.data.renderers import render_chat

ROUND_TRIP = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; isn't it?",
    "code": "def f(x):\r\n\tif x  >  1:\n        return {'a': [1, 2]}\t# tab\n\n\n    \r\n",
    "spaces": "  leading, trailing   and    runs of spaces   ",
    "german": "Größenwahn: Straßenbahnfahrer über Äpfel und Öl.",
    "spanish": "¿Dónde está la biblioteca? ¡Mañana, señor!",
    "french": "Où est l'hôtel ? Ça coûte 12,50 € — très cher.",
    "portuguese": "A ação não é fácil; coração, pão e irmã.",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟",
    "chinese": "今天天气很好，我们去公园散步吧。",
    "japanese": "吾輩は猫である。名前はまだ無い。カタカナも。",
    "korean": "안녕하세요, 만나서 반갑습니다.",
    "emoji": "🚀🔥 family: 👨‍👩‍👧‍👦, skin tone 👍🏽, flag 🇩🇪",
    "unseen_scripts": "ᐊᓂᔑᓈᐯᒧᐎᓐ ⴰⵣⵓⵍ ꦲꦏ꧀ꦱꦫ ᏣᎳᎩ ሰላም 𓀀𓁐 ߒߞߏ",
    "odd": "\x00\x07 ▁ literal metaspace, <0x41> literal byte token, \u200b zero width, e\u0301 combining",
}


def test_exact_size_and_stable_ids(embedded):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded[0])
    assert len(tok) == 4096
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert [vocab[t] for t in BYTE_TOKENS] == list(range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + 256))
    assert [token_bytes(t) for t in BYTE_TOKENS] == [bytes([b]) for b in range(256)]  # id 8 + b is byte b
    assert not any(t.startswith("<0x") for t in vocab)  # no byte-fallback tokens: byte-level BPE
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|endoftext|>", "<|pad|>", None)
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)
    assert all(tok.convert_tokens_to_ids(t) is not None for t in CHAT_STOP_TOKENS)


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip(embedded, name):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded[0])
    text = ROUND_TRIP[name]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Every token spells real bytes, and the bytes of the tokens are the text's UTF-8.
    assert b"".join(token_bytes(t) for t in tok.convert_ids_to_tokens(ids)) == text.encode("utf-8")
    if name == "unseen_scripts":  # characters no merge covers are spelled with single-byte tokens
        assert any(8 <= i < 264 for i in ids)


def test_loads_without_project_code(embedded):  # noqa: F811
    code = (
        "import sys; from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({str(embedded[0])!r}); "
        "assert t.decode(t.encode('x = 1\\n')) == 'x = 1\\n'; "
        "assert not [m for m in sys.modules if m.startswith(('genesis_hf', 'training'))], 'project imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Rate for USD->EUR?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "rate", "arguments": {"base": "USD", "target": "EUR"}}}]},
    {"role": "tool", "content": "{\"rate\": 0.92}"},
    {"role": "assistant", "content": "0.92 euros."},
]  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "rate", "description": "FX rate", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_template_matches_python_renderer(embedded, tools):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded[0])
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(MESSAGES, tools=tools, tokenize=False) == render_chat(MESSAGES, tools)
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nRate for USD->EUR?<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_mask_covers_assistant_turns_only(embedded):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded[0])
    out = tok.apply_chat_template(MESSAGES, tools=TOOLS, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    expected = '<tool_call>\n{"name": "rate", "arguments": {"base": "USD", "target": "EUR"}}\n</tool_call><|im_end|>0.92 euros.<|im_end|>'
    assert masked == expected
    assert tok.convert_tokens_to_ids("<tool_call>") in ids  # a single special token, not characters


def test_fingerprint_stable_and_sensitive(embedded, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    tok_dir = embedded[0]
    fp = tokenizer_fingerprint(tok_dir)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tok_dir))
    assert json.loads((tok_dir / "genesis_tokenizer.json").read_text())["fingerprint"] == fp
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = CHAT_TEMPLATE.replace("# Tools", "# Functions")
    assert tokenizer_fingerprint(tok) != fp


def test_train_from_files_cli_and_report(tmp_path):
    text = "\n\n".join(f"Paragraph {i}: the cat sat on the mat and the dog ran after it." for i in range(200))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"def f{i}(x):\n    return x * {i}\n"} for i in range(100)])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"Row {i} of a parquet file." for i in range(50)]}), tmp_path / "c.parquet")
    out = tmp_path / "tok"
    files = [str(tmp_path / f) for f in ("a.txt", "b.jsonl", "c.parquet")]
    assert cli_main(["train", *files, "--vocab-size", "320", "--min-frequency", "1", "--output", str(out),
                     "--no-progress"]) == 0  # fmt: skip
    report = json.loads((out / "genesis_tokenizer.json").read_text())
    assert report["vocab_size"] == 320 and set(report["bytes_per_token"]) == {"a.txt", "b.jsonl", "c.parquet"}
    assert all(v > 1.0 for v in report["bytes_per_token"].values())
    tok = train_tokenizer(iter([text]), 290, show_progress=False)  # an iterator of strings, not saved
    assert len(tok) == 290 and tok.decode(tok.encode(text)) == text


def test_train_from_mixture_recipe(tmp_path):
    from training.data.mixture import iter_mixture_texts
    from training.tokenizer_cli import cli_main as genesis_tokenizer

    # genesis_hf reads no mixture recipe itself (it never imports training): the pairs come from training/
    with pytest.raises(ValueError, match="a mixture recipe is read by the training package"):
        train_tokenizer([FIXTURES / "mixture.yaml"], 420, min_frequency=1, show_progress=False)
    tok = train_tokenizer(iter_mixture_texts(FIXTURES / "mixture.yaml"), 420, min_frequency=1, show_progress=False)
    assert len(tok) == 420
    assert "openhermes" in tok.genesis_report["bytes_per_token"]
    # `genesis tokenizer train MIXTURE.yaml` reads it through training/tokenizer_cli.py
    out = tmp_path / "tok"
    assert genesis_tokenizer(["train", str(FIXTURES / "mixture.yaml"), "--vocab-size", "420", "--min-frequency", "1",
                              "--output", str(out), "--no-progress"]) == 0
    assert "openhermes" in json.loads((out / "genesis_tokenizer.json").read_text())["bytes_per_token"]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], 400, show_progress=False)
    write_jsonl(tmp_path / "c.jsonl", [{"content": "x"}])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: missing field 'text'"):
        train_tokenizer([tmp_path / "c.jsonl"], 400, show_progress=False)
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(ValueError, match="bad.txt: not valid UTF-8"):
        train_tokenizer([tmp_path / "bad.txt"], 400, show_progress=False)
    with pytest.raises(ValueError, match="supports only"):
        train_tokenizer(iter(["tiny text"]), 5000, show_progress=False)
    with pytest.raises(ValueError, match="reserved"):
        train_tokenizer(iter(["tiny text"]), 100, show_progress=False)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(iter(["  ", ""]), 400, show_progress=False)


def _byte_fallback_tokenizer(folder):
    """The tokenizer family Genesis wrote before byte-level BPE: <0xNN> byte-fallback tokens, no merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from genesis_hf.tokenizer import PRETOKENIZE_PATTERN, wrap_tokenizer

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    wrap_tokenizer(tok).save_pretrained(folder)
    return folder


def test_shards_of_the_old_byte_fallback_tokenizer_are_refused(embedded, tmp_path):  # noqa: F811
    from _data_fixtures import make_data

    from training.data import shards
    from training.data.loader import PackedLoader, validation_batches

    old_tok = _byte_fallback_tokenizer(tmp_path / "old-tok")
    data = make_data(tmp_path, old_tok, {"a": 40})
    assert shards.read_manifest(data)["tokenizer_format"] is None  # no genesis_tokenizer.json
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["tokenizer_format"]  # as written before this field existed
    (data / "manifest.json").write_text(json.dumps(manifest))
    new_fp = tokenizer_fingerprint(embedded[0])
    assert new_fp != tokenizer_fingerprint(old_tok)
    for refuse in (
        lambda: PackedLoader(data, seq_len=16, micro_batch_size=1, expected_fingerprint=new_fp),
        lambda: validation_batches(data, seq_len=16, micro_batch_size=1, expected_fingerprint=new_fp),
        lambda: shards.verify(data, expected_fingerprint=new_fp),
    ):
        with pytest.raises(ValueError, match=r"refusing shards made by another tokenizer \(theirs: a byte-fallback BPE.*"
                                             r"genesis data prepare"):
            refuse()
    # Shards of the current tokenizer say which format made them.
    assert shards.read_manifest(embedded[1])["tokenizer_format"] == "byte-level-bpe"
