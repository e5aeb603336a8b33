"""Every recipe parses against the argument dataclass; bad recipes fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.args import ConfigError, load_recipe, parse_args
from training.pretrain import cli_main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "training" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    args = parse_args(["--config", str(recipe)])
    assert args.max_steps > 0 and args.keep_last >= 2


def test_genesis_1b_is_the_seed_run():
    a = parse_args(["--config", "training/recipes/genesis-1b.yaml"])
    assert a.per_device_train_batch_size * 2 * a.gradient_accumulation_steps * a.seq_len == 524_288
    assert (a.adam_beta1, a.adam_beta2, a.weight_decay) == (0.9, 0.95, 0.1)
    assert (a.learning_rate, a.min_lr, a.warmup_steps, a.max_steps) == (1e-4, 1e-5, 1000, 40000)
    assert a.lr_scheduler_type == "cosine" and a.gradient_checkpointing and a.save_minutes == 10.0
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads) == (1536, 32, 12, 6)
    assert a.mixture == "training/mixtures/genesis-60b.yaml"


def test_cli_overrides_yaml_overrides_defaults():
    a = parse_args(["--config", "training/recipes/debug.yaml", "--max_steps", "3", "--learning_rate", "2e-3"])
    assert a.max_steps == 3 and a.learning_rate == 2e-3 and a.seq_len == 64  # CLI > YAML > default
    assert a.adam_epsilon == 1e-8  # a default the recipe does not set


@pytest.mark.parametrize("text, match", [
    ("max_stepz: 3\n", "unknown key 'max_stepz'"),
    ("max_steps: three\n", "key 'max_steps' must be int"),
    ("learning_rate: 1e-4\n", "write floats with a dot"),
    ("max_steps: true\n", "key 'max_steps' must be int"),
    ("spike_policy: ignore\n", "must be one of"),
    ("max_steps: [1\n", "malformed YAML"),
    ("", "empty recipe"),
    ("- a\n- b\n", "flat mapping"),
])
def test_bad_recipe_is_one_clear_error(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_recipe(path)
    assert str(path) in str(e.value)


def test_non_utf8_and_missing_files(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"run_name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_recipe(path)
    assert cli_main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: recipe file not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="keep_last must be >= 2"):
        parse_args(["--config", "training/recipes/debug.yaml", "--keep_last", "1"])
