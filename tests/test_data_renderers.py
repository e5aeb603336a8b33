"""Each source schema, read from a fixture file in its real Hub schema, renders as expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _data_fixtures import FIXTURES

from training.data.mixture import load_mixture
from training.data.renderers import MissingField, get_renderer, render_chat

S, E = "<|im_start|>", "<|im_end|>\n"
TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions. Function signatures are inside <tools></tools>:\n<tools>\n")
TOOLS_TAIL = ("</tools>\n\nFor each call, return a JSON object with the function name and arguments inside "
              "<tool_call></tool_call> tags.")  # fmt: skip

EXPECTED = {
    "fineweb-edu": "Photosynthesis converts light energy into chemical energy.\nPlants store it as glucose.",
    "dclm": "How to repot a fern: choose a pot one size larger, loosen the roots, water well.",
    "starcoderdata": "def add(a, b):\r\n\treturn a + b\n\n\nclass  Box:\n    pass\n",
    "finemath": "Solve $2x + 3 = 11$. Subtract 3: $2x = 8$, so $x = 4$.",
    "wikipedia-de": "Berlin\n\nBerlin ist die Hauptstadt der Bundesrepublik Deutschland.",
    "culturax-ja": "東京は日本の首都です。人口は約1400万人です。",
    "cosmopedia": "Chapter 3: Sharing Pizza\n\nWhen we cut a pizza into 4 equal slices, each slice is one quarter.",
    "openhermes": f"{S}system\nYou are a helpful assistant.{E}{S}user\nWhat is 2+2?{E}{S}assistant\n2+2 equals 4.{E}",
    "orca-agentinstruct": f"{S}user\nSummarise: The cat sat on the mat.{E}{S}assistant\nA cat sat on a mat.{E}",
    "glaive-fc": (
        f"{S}system\nYou are a helpful assistant with access to the following functions. Use them if required\n\n"
        + TOOLS_HEAD
        + '{"name": "get_exchange_rate", "description": "Get the exchange rate between two currencies", '
        '"parameters": {"type": "object", "properties": {"base": {"type": "string"}, "target": {"type": "string"}}, '
        '"required": ["base", "target"]}}\n' + TOOLS_TAIL + E
        + f"{S}user\nHow many euros is one dollar?{E}"
        + f'{S}assistant\n<tool_call>\n{{"name": "get_exchange_rate", "arguments": {{"base": "USD", "target": "EUR"}}}}\n</tool_call>{E}'
        + f'{S}tool\n<tool_response>\n{{"rate": 0.92}}\n</tool_response>{E}'
        + f"{S}assistant\nOne US dollar is 0.92 euros.{E}"
    ),
    "gorilla": (
        f"{S}user\nClassify the sentiment of a movie review.{E}{S}assistant\n<<<domain>>>: Natural Language "
        "Processing Text Classification\n<<<api_call>>>: pipeline('sentiment-analysis')\n<<<api_provider>>>: "
        f"Hugging Face Transformers{E}"
    ),
    "hermes-fc": (
        f'{S}system\nYou are a function calling AI model. <tools>[{{"type": "function", "function": {{"name": '
        f'"get_weather", "parameters": {{"type": "object", "properties": {{"city": {{"type": "string"}}}}}}}}}}]</tools>{E}'
        f"{S}user\nWeather in Paris?{E}"
        f'{S}assistant\n<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n</tool_call>{E}'
        f'{S}tool\n<tool_response>\n{{"temp_c": 18}}\n</tool_response>{E}'
        f"{S}assistant\nIt is 18 °C in Paris.{E}"
    ),
    "xlam-fc": (
        f"{S}system\n" + TOOLS_HEAD
        + '{"name": "live_giveaways_by_type", "description": "Retrieve live giveaways by type.", "parameters": '
        '{"type": {"description": "The type of giveaways.", "type": "str", "default": "game.key"}}}\n'
        + TOOLS_TAIL + E + f"{S}user\nWhere can I find live giveaways for beta access?{E}"
        + f'{S}assistant\n<tool_call>\n{{"name": "live_giveaways_by_type", "arguments": {{"type": "beta"}}}}\n</tool_call>{E}'
    ),
}
MIXTURE = load_mixture(FIXTURES / "mixture.yaml")
JSON_SOURCES = [s for s in MIXTURE.sources if s.format == "json"]


@pytest.mark.parametrize("spec", JSON_SOURCES, ids=[s.name for s in JSON_SOURCES])
def test_schema_renders_first_record(spec):
    record = json.loads(open(spec.data_files[0], encoding="utf-8").readline())
    assert get_renderer(spec.schema)(record, spec.fields) == EXPECTED[spec.name]


def test_every_expected_schema_has_a_fixture():
    assert set(EXPECTED) == {s.name for s in JSON_SOURCES}
    assert {s.schema for s in MIXTURE.sources} == {"text", "sharegpt", "messages", "glaive", "gorilla", "xlam"}


def test_missing_field_names_the_field():
    with pytest.raises(MissingField, match="'content'"):
        get_renderer("text")({"text_": "x"}, {"text": "content"})
    with pytest.raises(MissingField, match="'conversations'"):
        get_renderer("sharegpt")({"messages": []}, {})


def test_unknown_speaker_and_schema():
    with pytest.raises(ValueError, match="unknown sharegpt speaker 'narrator'"):
        get_renderer("sharegpt")({"conversations": [{"from": "narrator", "value": "x"}]}, {})
    with pytest.raises(ValueError, match="unknown schema 'html'"):
        get_renderer("html")


def test_parallel_tool_calls_and_string_arguments():
    text = render_chat([
        {"role": "user", "content": "both"},
        {"role": "assistant", "content": "Calling.", "tool_calls": [
            {"function": {"name": "a", "arguments": {"x": 1}}}, {"name": "b", "arguments": {}}]},
    ])  # fmt: skip
    assert text.endswith('Calling.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
                         '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call><|im_end|>\n')  # fmt: skip


RECIPES = sorted((Path(__file__).resolve().parents[1] / "training" / "mixtures").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipes_parse_with_weights_summing_to_one(recipe, caplog):
    mix = load_mixture(recipe)
    assert "normalising" not in caplog.text and abs(sum(mix.weights.values()) - 1) < 1e-9


def test_genesis_60b_names_the_seed_sources():
    mix = load_mixture(Path(__file__).resolve().parents[1] / "training" / "mixtures" / "genesis-60b.yaml")
    hub = {s.hub_id for s in mix.sources}
    for repo in ("HuggingFaceFW/fineweb-edu", "mlfoundations/dclm-baseline-1.0-parquet", "bigcode/starcoderdata",
                 "HuggingFaceTB/finemath", "wikimedia/wikipedia", "uonlp/CulturaX", "teknium/OpenHermes-2.5",
                 "microsoft/orca-agentinstruct-1M-v1", "glaiveai/glaive-function-calling-v2", "gorilla-llm/APIBench",
                 "NousResearch/hermes-function-calling-v1", "Salesforce/xlam-function-calling-60k",
                 "HuggingFaceTB/cosmopedia"):  # fmt: skip
        assert repo in hub, repo
    culturax = {s.subset for s in mix.sources if s.hub_id == "uonlp/CulturaX"}
    assert culturax == {"ar", "de", "es", "fr", "ja", "ko", "pt", "zh"}
    assert {s.schema for s in mix.sources} == {s.schema for s in MIXTURE.sources}  # every schema has a fixture
