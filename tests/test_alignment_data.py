"""Alignment data: adapters for the seed's sets, validation errors that name the row, truncation, prompts."""

import json
import logging

import pytest
from _alignment_fixtures import DATA_DIR, make_tokenizer, write_jsonl

from alignment.data import (
    ADAPTERS,
    DataError,
    load_preference_dataset,
    load_rows,
    load_sft_dataset,
    read_prompts,
    truncate_prompt,
    validate_messages,
)
from alignment.generate import ChatTemplateError, require_chat_template


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _roles(messages):
    return [m["role"] for m in messages]


# --- adapters: one hand-made row in each source's own format -----------------------------------


def test_openhermes_and_hermes_sharegpt():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                             {"from": "gpt", "value": "Hello."}]}
    assert _roles(ADAPTERS["openhermes"](row)["messages"]) == ["system", "user", "assistant"]
    hermes = {"conversations": [
        {"from": "system", "value": "<tools>[]</tools>"}, {"from": "human", "value": "Weather in Oslo?"},
        {"from": "gpt", "value": "<tool_call>\n{\"name\": \"w\", \"arguments\": {}}\n</tool_call>"},
        {"from": "tool", "value": "<tool_response>\n{\"t\": 3}\n</tool_response>"},
        {"from": "gpt", "value": "3 C."}]}
    msgs = ADAPTERS["hermes"](hermes)["messages"]
    assert _roles(msgs) == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[3]["content"] == '{"t": 3}'  # the template adds <tool_response>; no double wrapping
    validate_messages(msgs)


def test_orca_agentinstruct_json_string_and_empty_system():
    row = {"messages": json.dumps([{"role": "system", "content": ""}, {"role": "user", "content": "Plan a trip."},
                                   {"role": "assistant", "content": "Day 1: Kyoto."}])}
    assert _roles(ADAPTERS["orca_agentinstruct"](row)["messages"]) == ["user", "assistant"]


def test_glaive_function_call_and_response():
    row = {
        "system": "SYSTEM: You are a helpful assistant with access to functions: {\"name\": \"calc\"}",
        "chat": "USER: What is 2+2?\n\n\nASSISTANT: <functioncall> {\"name\": \"calc\", \"arguments\": "
        "'{\"expr\": \"2+2\"}'} <|endoftext|>\n\n\nFUNCTION RESPONSE: {\"result\": 4}\n\n\nASSISTANT: It is 4. "
        "<|endoftext|>\n\n\n",
    }
    msgs = ADAPTERS["glaive"](row)["messages"]
    assert _roles(msgs) == ["system", "user", "assistant", "tool", "assistant"]
    call = msgs[2]["content"]
    assert call.startswith("<tool_call>\n") and call.endswith("\n</tool_call>")
    assert json.loads(call.split("\n")[1]) == {"name": "calc", "arguments": {"expr": "2+2"}}
    assert msgs[4]["content"] == "It is 4."
    validate_messages(msgs)


def test_gorilla_and_xlam():
    g = {"code": "###Instruction: Classify this image of a cat.\n###Output: <<<domain>>>: Vision\n"
                 "<<<api_call>>>: pipeline('image-classification')"}
    msgs = ADAPTERS["gorilla"](g)["messages"]
    assert msgs[0] == {"role": "user", "content": "Classify this image of a cat."}
    assert "<<<api_call>>>" in msgs[1]["content"]
    x = {"query": "Weather in Oslo and Rome?", "tools": json.dumps([{"name": "w", "parameters": {}}]),
         "answers": json.dumps([{"name": "w", "arguments": {"city": "Oslo"}}, {"name": "w", "arguments": {"city": "Rome"}}])}
    msgs = ADAPTERS["xlam"](x)["messages"]
    assert _roles(msgs) == ["system", "user", "assistant"]
    assert "<tools>" in msgs[0]["content"] and msgs[2]["content"].count("<tool_call>") == 2
    validate_messages(msgs)


def test_every_adapter_renders_through_the_genesis_template(tok, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]
    ds, stats = load_sft_dataset(str(write_jsonl(tmp_path / "oh.jsonl", rows)), adapter="openhermes", tokenizer=tok,
                                 max_prompt_length=64)
    text = tok.apply_chat_template(ds[0]["messages"], tokenize=False)
    assert text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    assert stats == {"source": str(tmp_path / "oh.jsonl"), "rows": 1, "truncated": 0}


# --- bad input: one error naming the source and the row ------------------------------------------

GOOD = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


@pytest.mark.parametrize(
    "bad,match",
    [
        ([{"content": "Q?"}, {"role": "assistant", "content": "A."}], "row 1: message 0 has no role"),
        ([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "  "}], r"row 1: message 1 \(assistant\) is empty"),
        ([{"role": "user", "content": "Q?"}, {"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A."}],
         "row 1: roles do not alternate: message 1 is 'user' after 'user'"),
        ([{"role": "user", "content": "Q?"}], "row 1: has no assistant turn"),
        ([{"role": "assistant", "content": "A."}], "row 1: starts with 'assistant'"),
        ([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}, {"role": "user", "content": "B?"}],
         "row 1: ends with 'user'"),
        ([{"role": "robot", "content": "Q?"}], "row 1: message 0 has unknown role 'robot'"),
    ],
)
def test_bad_sft_rows_raise_naming_the_row(tmp_path, bad, match):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": GOOD}, {"messages": bad}])
    with pytest.raises(DataError, match=match) as err:
        load_sft_dataset(str(path))
    assert str(path) in str(err.value)


def test_bad_preference_rows_raise_naming_the_row(tmp_path):
    rows = [{"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}, {"prompt": "Q?", "chosen": "", "rejected": "x"}]
    with pytest.raises(DataError, match=r"pairs.jsonl row 1: chosen is empty"):
        load_preference_dataset(str(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    rows = [{"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError, match="row 0: starts with 'assistant'"):
        load_preference_dataset(str(write_jsonl(tmp_path / "p2.jsonl", rows)))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"messages": [\n', encoding="utf-8")
    with pytest.raises(DataError, match="broken.jsonl: cannot be read as json"):
        load_rows(str(tmp_path / "broken.jsonl"))
    with pytest.raises(DataError, match="unknown adapter 'sharegpt4'"):
        load_sft_dataset(str(tmp_path / "broken.jsonl"), adapter="sharegpt4")


def test_tokenizer_without_chat_template_is_a_clear_error():
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat_template"):
        require_chat_template(bare, "tokenizer of runs/x")


# --- formats and truncation ----------------------------------------------------------------------


def test_preference_formats_plain_conversational_and_implicit_prompt(tmp_path):
    rows = [
        {"prompt": "Why?", "chosen": "Because 42.", "rejected": "It depends."},
        {"chosen": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}],
         "rejected": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Unsure."}]},
    ]
    ds, stats = load_preference_dataset(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert stats["rows"] == 2
    for r in ds:
        assert r["prompt"] == [{"role": "user", "content": "Why?"}]
        assert [m["role"] for m in r["chosen"]] == ["assistant"] == [m["role"] for m in r["rejected"]]


def test_long_prompts_are_truncated_and_counted(tok, tmp_path, caplog):
    long_q = "Tell me about the ocean. " * 80 + "What is the question?"
    rows = [
        {"messages": [{"role": "user", "content": "Short?"}, {"role": "assistant", "content": "Yes."}]},
        {"messages": [{"role": "user", "content": long_q}, {"role": "assistant", "content": "Answer."}]},
        {"messages": [{"role": "user", "content": long_q}, {"role": "assistant", "content": "First."},
                      {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Second."}]},
    ]
    with caplog.at_level(logging.WARNING, logger="alignment.data"):
        ds, stats = load_sft_dataset(str(write_jsonl(tmp_path / "long.jsonl", rows)), tokenizer=tok,
                                     max_prompt_length=48)
    assert stats["truncated"] == 2
    assert "truncated 2 of 3 prompts longer than 48 tokens" in caplog.text
    assert ds[0]["messages"] == rows[0]["messages"]
    cut = ds[1]["messages"]
    assert cut[-1] == {"role": "assistant", "content": "Answer."}
    assert cut[0]["content"].endswith("What is the question?")  # the end of the ask is kept
    prompt_ids = tok.apply_chat_template(cut[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert len(prompt_ids) <= 48
    # Multi-turn: the oldest exchange is dropped whole, so roles still alternate.
    assert _roles(ds[2]["messages"]) == ["user", "assistant"] and ds[2]["messages"][0]["content"] == "And now?"


def test_truncate_prompt_keeps_short_prompts_untouched(tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert truncate_prompt(prompt, tok, 64) == (prompt, False)


def test_read_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "A?"}, {"prompt": [{"role": "user", "content": "B?"}]}])
    assert read_prompts(path) == ["A?", "B?"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl row 1: has no non-empty 'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")


def test_bundled_data_is_valid_and_held_out():
    sft, _ = load_sft_dataset(str(DATA_DIR / "sft_conversations.jsonl"))
    pairs, _ = load_preference_dataset(str(DATA_DIR / "preference_seeds.jsonl"))
    eval_prompts = set(read_prompts(DATA_DIR / "eval_prompts.jsonl"))
    train_prompts = {m["content"] for r in sft for m in r["messages"] if m["role"] == "user"}
    train_prompts |= {r["prompt"][0]["content"] for r in pairs} | set(read_prompts(DATA_DIR / "pair_prompts.jsonl"))
    assert len(sft) >= 30 and len(pairs) >= 10 and len(eval_prompts) >= 15
    assert not eval_prompts & train_prompts, "evaluation prompts must not appear in training data"


def test_sft_mixture_of_adapted_sources(tok, tmp_path):
    import yaml

    from alignment.sft import SFTScriptArguments, load_mixture

    oh = write_jsonl(tmp_path / "oh.jsonl", [{"conversations": [{"from": "human", "value": "Hi?"},
                                                                {"from": "gpt", "value": "Hello."}]}] * 3)
    xl = write_jsonl(tmp_path / "xl.jsonl", [{"query": "Oslo?", "tools": "[]",
                                              "answers": json.dumps([{"name": "w", "arguments": {"c": "Oslo"}}])}] * 2)
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump([{"source": str(oh), "adapter": "openhermes"},
                                   {"source": str(xl), "adapter": "xlam", "max_samples": 1}]))
    ds, stats = load_mixture(SFTScriptArguments(dataset_mixture=str(mix)), tok)
    assert len(ds) == 4 and stats["rows"] == 4 and [s["rows"] for s in stats["sources"]] == [3, 1]
    mix.write_text(yaml.safe_dump([{"source": str(oh), "adaptor": "openhermes"}]))
    with pytest.raises(DataError, match=r"mix.yaml: entry 0 has unknown fields \['adaptor'\]"):
        load_mixture(SFTScriptArguments(dataset_mixture=str(mix)), tok)
