"""SFT and DPO through our scripts on a tiny Genesis export: loss falls, reward margin grows, and the
result round-trips through `AutoModelForCausalLM.from_pretrained` with the constitution in its card."""

from pathlib import Path

import pytest
from _alignment_fixtures import DATA_DIR, make_model_folder

from alignment import dpo, sft
from alignment.constitution import load_constitution

RECIPES = Path(__file__).resolve().parents[1] / "alignment" / "recipes"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """export folder -> SFT (40 steps) -> DPO (24 steps), both through main() as the CLI runs them."""
    root = tmp_path_factory.mktemp("train")
    base = make_model_folder(root)
    sft_out = sft.main(*sft.parse([
        "--config", str(RECIPES / "sft-tiny.yaml"), "--model_name_or_path", str(base),
        "--dataset_name", str(DATA_DIR / "sft_conversations.jsonl"), "--output_dir", str(root / "sft"),
    ]))
    dpo_out = dpo.main(*dpo.parse([
        "--config", str(RECIPES / "dpo-tiny.yaml"), "--model_name_or_path", str(root / "sft"),
        "--dataset_name", str(DATA_DIR / "preference_seeds.jsonl"), "--output_dir", str(root / "dpo"),
    ]))
    return root, sft_out, dpo_out


def test_sft_loss_falls(trained):
    _, out, _ = trained
    losses = [h["loss"] for h in out["log_history"] if "loss" in h]
    assert len(losses) == 40  # the tiny recipe's max_steps
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.3, losses


def test_dpo_reward_margin_grows(trained):
    _, _, out = trained
    margins = out["reward_margins"]
    assert len(margins) == 24  # the tiny recipe's max_steps
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert sum(margins[-4:]) / 4 > 0.5, margins
    losses = [h["loss"] for h in out["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] - 0.2


def test_round_trip_from_pretrained_with_constitution_in_card(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genesis_hf import GenesisForCausalLM

    root, _, _ = trained
    constitution = load_constitution()
    for stage in ("sft", "dpo"):
        folder = root / stage
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(model, GenesisForCausalLM)
        remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  # the auto_map path
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.chat_template and "{%- generation %}" in tok.chat_template
        ids = tok.apply_chat_template([{"role": "user", "content": "Why?"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, remote(input_ids=ids).logits)
        assert model.generation_config.eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>")
        card = (folder / "README.md").read_text(encoding="utf-8")
        assert f"version **{constitution.version}**" in card and f"Stage: **{stage}**" in card
        assert all(p.name in card for p in constitution.principles)
        assert (folder / "constitution.yaml").read_bytes() == Path(constitution.path).read_bytes()
    # DPO changed the weights it started from.
    a = AutoModelForCausalLM.from_pretrained(root / "sft").state_dict()
    b = AutoModelForCausalLM.from_pretrained(root / "dpo").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["sft-tiny.yaml", "dpo-tiny.yaml",
                                  "sft-genesis-1b.yaml", "dpo-genesis-1b.yaml"])
def test_every_training_recipe_parses_against_its_script(name):
    module = sft if name.startswith("sft") else dpo
    # bf16 is refused on a CPU-only host; everything else must parse as written (unknown keys fail).
    script_args, training_args, model_args = module.parse(["--config", str(RECIPES / name), "--bf16", "false"])
    assert training_args.activation_checkpointing is False
    if name.startswith("sft"):
        assert training_args.assistant_only_loss and training_args.packing
    if "1b" in name:
        assert model_args.dtype == "bfloat16" and training_args.report_to == ["wandb"]


def test_dpo_prefers_curious_answers_on_held_out_pairs(trained):
    """The goal, measured on prompts DPO never saw: the model's own log-probs move toward the curious answer."""
    from alignment.evaluate import preference_margin
    from alignment.generate import load_model_and_tokenizer
    from alignment.pairs import read_seed_pairs

    root, _, _ = trained
    pairs = read_seed_pairs(DATA_DIR / "eval_pairs.jsonl")
    held_out = {p["prompt"][0]["content"] for p in pairs}
    assert not held_out & {p["prompt"][0]["content"] for p in read_seed_pairs(DATA_DIR / "preference_seeds.jsonl")}
    pref = {stage: preference_margin(*load_model_and_tokenizer(root / stage, device="cpu"), pairs) for stage in ("sft", "dpo")}
    assert pref["dpo"]["pref_margin"] > pref["sft"]["pref_margin"] + 0.05, pref
    assert pref["dpo"]["pref_accuracy"] >= 0.75, pref


def test_torch_compile_compiles_each_decoder_layer_not_the_whole_model(tmp_path):
    """`torch_compile` in a TRL config: the scripts compile every decoder layer in place and turn the
    Trainer's whole-model compile off. The `eager` dynamo backend traces the same graphs as inductor
    without its C++ builds; its losses equal the uncompiled run's."""
    import torch
    from torch._dynamo.utils import counters

    base = make_model_folder(tmp_path)
    out = {}
    for name, extra in (("eager", []), ("compiled", ["--torch_compile_backend", "eager"])):
        counters.clear()
        out[name] = sft.main(*sft.parse([
            "--config", str(RECIPES / "sft-tiny.yaml"), "--model_name_or_path", str(base), "--max_steps", "3",
            "--dataset_name", str(DATA_DIR / "sft_conversations.jsonl"), "--output_dir", str(tmp_path / name),
            *extra]))
    assert out["eager"]["distributed"]["compiled_layers"] == 0
    assert out["compiled"]["distributed"]["compiled_layers"] == 2  # both GenesisDecoderLayers
    assert out["compiled"]["distributed"]["whole_model_compile"] == "NO"
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters)
    losses = {k: [h["loss"] for h in v["log_history"] if "loss" in h] for k, v in out.items()}
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-5, atol=1e-5)
