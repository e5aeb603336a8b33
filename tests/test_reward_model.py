"""A reward model trains on CPU from our preference pairs (TRL's RewardTrainer on a
GenesisForSequenceClassification) and ranks answers in `genesis align pairs --scorer reward:PATH`."""

import json

import pytest
import torch
from _alignment_fixtures import DATA_DIR, make_model_folder, write_jsonl

from alignment import reward
from alignment.cli import build_parser, cli_main
from alignment.scorer import RewardScorer, get_scorer
from genesis_hf import GenesisForSequenceClassification

RECIPE = DATA_DIR.parent / "recipes" / "reward-tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    base = make_model_folder(tmp)
    out = tmp / "rm"
    script_args, training_args = reward.parse(["--config", str(RECIPE), "--model_name_or_path", str(base),
                                               "--dataset_name", str(DATA_DIR / "preference_seeds.jsonl"),
                                               "--output_dir", str(out), "--max_steps", "30", "--use_cpu", "true"])  # fmt: skip
    return base, reward.main(script_args, training_args)


def test_reward_model_trains_on_the_pairs_and_prefers_chosen(trained):
    _, out = trained
    scorer = get_scorer(f"reward:{out}")
    assert isinstance(scorer, RewardScorer)
    assert isinstance(scorer.model, GenesisForSequenceClassification)
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_genesis.GenesisForSequenceClassification"
    )
    rows = [json.loads(line) for line in (DATA_DIR / "preference_seeds.jsonl").read_text().splitlines() if line]
    wins = 0
    for row in rows:
        prompt = row["prompt"][0]["content"]
        chosen = scorer.score(prompt, row["chosen"][0]["content"])
        rejected = scorer.score(prompt, row["rejected"][0]["content"])
        assert -1.0 < chosen.total < 1.0 and "reward" in chosen.details
        wins += chosen.total > rejected.total
    # 30 steps on 12 pairs: the training pairs are learned (an untrained head is a coin flip).
    assert wins >= len(rows) - 1, f"chosen preferred in {wins}/{len(rows)} pairs"


def test_align_pairs_scores_with_the_reward_model(trained, tmp_path):
    base, out = trained
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Why is the ocean salty?"},
                                                       {"prompt": "How do magnets work?"}])  # fmt: skip
    pairs = tmp_path / "pairs.jsonl"
    rc = cli_main(["pairs", "--model", str(base), "--prompts", str(prompts), "--output", str(pairs), "--k", "3",
                   "--max-new-tokens", "6", "--min-margin", "0", "--scorer", f"reward:{out}"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows and all(r["score_chosen"] >= r["score_rejected"] for r in rows)


def test_scorer_flag_refuses_a_bare_reward_or_an_unknown_name(capsys):
    parser = build_parser()
    for bad in ("reward:", "reward", "llm"):
        with pytest.raises(SystemExit):
            parser.parse_args(["pairs", "--model", "m", "--prompts", "p", "--output", "o", "--scorer", bad])
        assert "choose rule, judge or reward:PATH" in capsys.readouterr().err


def test_sequence_classification_scores_the_last_non_pad_token():
    from genesis_hf import GenesisConfig

    torch.manual_seed(0)
    model = GenesisForSequenceClassification(GenesisConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=1, num_attention_heads=2,
                                                           num_key_value_heads=1, num_labels=1, pad_token_id=0))  # fmt: skip
    model.eval()
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    with torch.no_grad():
        padded = model(ids, attention_mask=(ids != 0).long()).logits
        alone = model(ids[:, :3]).logits
    torch.testing.assert_close(padded, alone)
