"""`genesis`: every subcommand imports and answers --help; unknown commands are refused."""

import subprocess
import sys

import pytest

from genesis_cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_refused(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "genesis_cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "quickstart" in result.stdout
