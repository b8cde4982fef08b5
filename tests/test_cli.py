"""CLI skeleton: help, version, info, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hrank import __version__
from hrank.cli import main


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "info" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_info_resnet56_table(capsys):
    assert main(["info", "--model", "resnet_56"]) == 0
    out = capsys.readouterr().out
    assert "layer3.8.conv2" in out and "125.49M MACs" in out and "0.85M params" in out


def test_unknown_model_is_one_line_exit_2(capsys):
    assert main(["info", "--model", "resnet_57"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown model 'resnet_57'" in err and "resnet_56" in err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["rank", "--out", "x.npz"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "required: --model" in err and "Traceback" not in err
    assert main(["info"]) == 2  # --model or --model-file
    assert capsys.readouterr().err == "hrank: error: no model: give --model (an architecture or a saved model) or " \
                                      "--model-file\n"
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "hrank", "info", "--model", "resnet_20"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "total:" in r.stdout


def test_ctrl_c_while_the_commands_import_is_one_line(capsys, monkeypatch):
    """Building the parser imports torch (a second or more): Ctrl-C then is an interruption, not a traceback."""
    import hrank.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(hrank.cli, "build_parser", interrupted)
    assert main(["info", "--model", "resnet_56"]) == 130
    assert capsys.readouterr().err == "hrank: interrupted\n"
