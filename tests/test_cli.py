"""The ``road-vlm`` command: top-level help and every subcommand's help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from road_vlm.cli import build_parser, main

SUBCOMMANDS = ("build-base", "convert-llava", "train", "eval", "score", "chat", "chat-ui", "merge", "export", "compose", "serve", "board", "demo")


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"road-vlm {name}" in capsys.readouterr().out


def test_every_subcommand_has_a_handler() -> None:
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest == "command"]
    assert set(actions[0].choices) == set(SUBCOMMANDS)
    for name, sub in actions[0].choices.items():
        assert callable(sub.get_default("func")), name


def test_console_script_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "road_vlm.cli", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("road-vlm ")


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
