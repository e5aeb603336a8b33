"""Commands: TRL's own `trl sft` on our model folder, `genesis align cycle` end to end with lineage,
`genesis align eval|revise|compare`, and their bad-input errors."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _alignment_fixtures import DATA_DIR, make_model_folder, write_jsonl

from alignment.cli import cli_main

RECIPES = Path(__file__).resolve().parents[1] / "alignment" / "recipes"
SENTINELS = {"HF_TOKEN": "hf_SENTINELtokenDoNotLeak123", "WANDB_API_KEY": "wandbSENTINELkeyDoNotLeak456"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("cli"))


def test_trl_cli_sft_trains_our_model_folder(base, tmp_path):
    """`trl sft` does not import genesis_hf: the folder's auto_map code loads with --trust_remote_code."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes((DATA_DIR / "sft_conversations.jsonl").read_bytes())
    trl = Path(sys.executable).with_name("trl")
    cmd = [str(trl), "sft", "--model_name_or_path", str(base), "--dataset_name", str(data), "--trust_remote_code",
           "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
           "--max_length", "128", "--assistant_only_loss", "--activation_checkpointing", "false", "--bf16", "false",
           "--report_to", "none"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "GenesisForCausalLM"


def _tiny_cycle_recipe(tmp_path: Path) -> Path:
    """cycle-tiny.yaml with absolute paths and fewer steps, so the test runs anywhere in seconds."""
    for stage, steps in (("sft", 6), ("dpo", 4)):
        r = yaml.safe_load((RECIPES / f"{stage}-tiny.yaml").read_text())
        r["max_steps"] = steps
        r["dataset_name"] = str(DATA_DIR / ("sft_conversations.jsonl" if stage == "sft" else "preference_seeds.jsonl"))
        (tmp_path / f"{stage}.yaml").write_text(yaml.safe_dump(r))
    prompts = write_jsonl(tmp_path / "pair_prompts.jsonl", [{"prompt": p} for p in ("Why is Mars red?", "How do bees make honey?")])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p} for p in ("How do magnets work?", "Are ghosts real?")])
    c = yaml.safe_load((RECIPES / "cycle-tiny.yaml").read_text())
    c.update(sft_recipe=str(tmp_path / "sft.yaml"), dpo_recipe=str(tmp_path / "dpo.yaml"),
             output_dir=str(tmp_path / "cycles"))
    c["pairs"].update(prompts=str(prompts), k=2, max_new_tokens=8, min_margin=0.0,
                      seeds=str(DATA_DIR / "preference_seeds.jsonl"))
    c["eval"].update(prompts=str(evals), max_new_tokens=8)
    (tmp_path / "cycle.yaml").write_text(yaml.safe_dump(c))
    return tmp_path / "cycle.yaml"


def test_cycle_end_to_end_records_lineage_and_never_leaks_secrets(base, tmp_path, monkeypatch, capsys):
    for k, v in SENTINELS.items():
        monkeypatch.setenv(k, v)
    recipe = _tiny_cycle_recipe(tmp_path)
    assert cli_main(["cycle", "--config", str(recipe), "--parent", str(base), "--parent-step", "40000",
                     "--name", "from-40k"]) == 0
    out = tmp_path / "cycles" / "from-40k"
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["parent"] == {"checkpoint": str(base), "step": 40000}
    assert lineage["constitution"]["version"] == "1.0"
    assert set(lineage["scores"]) == {"base", "sft", "dpo"}
    for stage in ("base", "sft", "dpo"):
        assert {"hedging_rate", "curiosity", "score", "n"} <= set(lineage["scores"][stage])
        assert (out / stage / "config.json").is_file()
    assert lineage["data"]["sft"]["data"]["rows"] == 33
    assert lineage["data"]["pairs"]["seed_pairs"] == 12 and lineage["data"]["dpo"]["data"]["rows"] >= 12
    assert lineage["recipes"]["sft"]["values"]["max_steps"] == 6 and len(lineage["recipes"]["dpo"]["sha256"]) == 64
    assert "| dpo |" in (out / "results.md").read_text()
    assert 0.0 <= lineage["scores"]["dpo"]["pref_accuracy"] <= 1.0 and lineage["eval_pairs"]["n"] == 8
    assert list((out / "wandb").rglob("*.wandb")), "an offline wandb run was written"

    # Secrets: in no file of the cycle folder (lineage, cards, recipes, wandb run, training args).
    for path in out.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for v in SENTINELS.values():
                assert v.encode() not in blob, f"{v} leaked into {path}"

    # Cycles compare side by side; a finished cycle's folder is never reused.
    capsys.readouterr()
    assert cli_main(["compare", str(out / "lineage.json")]) == 0
    table = capsys.readouterr().out
    assert "| from-40k | 40000 | v1.0 | sft |" in table
    assert cli_main(["cycle", "--config", str(recipe), "--parent", str(base), "--name", "from-40k"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_eval_and_revise_commands(base, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Why do cats purr?"}, {"prompt": "What is entropy?"}])
    assert cli_main(["eval", "--model", f"base={base}", "--prompts", str(prompts), "--max-new-tokens", "6",
                     "--output", str(tmp_path / "eval.json")]) == 0
    assert "| base | 2 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["base"]["n"] == 2
    # The LLM-judge scorer, with our own checkpoint as the judge.
    assert cli_main(["eval", "--model", f"base={base}", "--prompts", str(prompts), "--max-new-tokens", "4",
                     "--scorer", "judge", "--judge-model", str(base), "--output", str(tmp_path / "judge.json")]) == 0
    assert json.loads((tmp_path / "judge.json").read_text())["base"]["scorer"] == "judge"

    assert cli_main(["revise", "--model", str(base), "--prompts", str(prompts), "--output", str(tmp_path / "rev.jsonl"),
                     "--principles", "curiosity", "directness", "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "rev.jsonl").read_text().splitlines()]
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["prompts"] == 2 and len(rows) == stats["kept_revision"] + stats["kept_initial"]
    for r in rows:
        assert [c["principle"] for c in r["critiques"]] == ["curiosity", "directness"]
        assert r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"


def test_bad_cycle_recipes_fail_with_one_clear_line(tmp_path, capsys):
    assert cli_main(["cycle", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "parent": "p", "output_dir": "o", "sft_recipe": "s", "dpo_recipe": "d",
                                   "learning_rate": 1.0}))
    assert cli_main(["cycle", "--config", str(bad)]) == 2
    assert "unknown keys ['learning_rate']" in capsys.readouterr().err
    c = yaml.safe_load((RECIPES / "cycle-tiny.yaml").read_text())
    bad.write_text(yaml.safe_dump(c))
    assert cli_main(["cycle", "--config", str(bad)]) == 2  # parent is null in the recipe
    assert "field 'parent' is required" in capsys.readouterr().err


@pytest.mark.distributed
def test_sft_then_dpo_under_accelerate_launch_with_two_cpu_processes(base, tmp_path):
    """The documented `accelerate launch ... alignment/sft.py --config ...` path, 2 gloo ranks (MULTI_CPU).

    `--use_cpu true` is what makes TrainingArguments see the CPU ranks as distributed. 44 s at load 6.
    Under CPU load a launch used to stall after training: freeing the trainer deadlocked gloo's teardown
    (alignment/sft.py:end_run); the scripts now end multi-process runs with os._exit. Should a launch
    stall again, it fails after 240 s with every rank's traceback (faulthandler) instead of hanging."""
    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:  # a free port: other suites on this machine may hold 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
              str(root / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2", "--main_process_port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    common = ["--use_cpu", "true", "--max_steps", "3"]
    for stage, parent, data in (("sft", base, "sft_conversations.jsonl"), ("dpo", tmp_path / "sft", "preference_seeds.jsonl")):
        cmd = [*launch, str(root / "alignment" / f"{stage}.py"), "--config", str(RECIPES / f"{stage}-tiny.yaml"),
               "--model_name_or_path", str(parent), "--dataset_name", str(DATA_DIR / data),
               "--output_dir", str(tmp_path / stage), *common]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                                env={**env, "PYTHONFAULTHANDLER": "1"}, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGABRT)  # faulthandler: every rank prints where it is stuck
            _, err = proc.communicate()
            pytest.fail(f"{stage} under accelerate launch timed out; stderr tail:\n{err[-6000:]}")
        assert proc.returncode == 0, err[-3000:]
        assert err.count(f"{stage.upper()} done") == 1  # one rank writes the card and logs
        assert "Stage: **" + stage + "**" in (tmp_path / stage / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")).__name__ == "GenesisForCausalLM"


def test_scripts_refuse_a_tokenizer_without_chat_template(base, tmp_path):
    import shutil

    from alignment import sft
    from alignment.generate import ChatTemplateError

    folder = tmp_path / "no-template"
    shutil.copytree(base, folder)
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatTemplateError, match=f"tokenizer of {folder} has no chat_template"):
        sft.main(*sft.parse(["--config", str(RECIPES / "sft-tiny.yaml"), "--model_name_or_path", str(folder),
                             "--dataset_name", str(DATA_DIR / "sft_conversations.jsonl"),
                             "--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_revise_runs_with_any_hf_causal_lm(tmp_path, capsys):
    """Critique-and-revise is not Genesis-specific: a plain Llama folder works the same way."""
    from _alignment_fixtures import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
                     ).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Why do cats purr?"}])
    assert cli_main(["revise", "--model", str(tmp_path / "llama"), "--prompts", str(prompts),
                     "--output", str(tmp_path / "rev.jsonl"), "--principles", "no-refusal-theatre",
                     "--max-new-tokens", "4"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["prompts"] == 1 and stats["kept_revision"] + stats["kept_initial"] + stats["empty"] == 1
    rows = [json.loads(line) for line in (tmp_path / "rev.jsonl").read_text().splitlines()]
    assert len(rows) == 1 - stats["empty"]
    for row in rows:
        assert row["critiques"][0]["principle"] == "no-refusal-theatre"
