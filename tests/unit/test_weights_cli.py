"""`wan-vace weights fetch`: the same fetch as scripts/fetch_weights.py (pipelines/hub.py), with
the script's flags and exit codes (tests/unit/test_weights.py drives the fetch itself)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

import pytest

from pipelines.weights import fetch_command, load_catalog
from server import cli


def test_tiny_needs_nothing_and_an_unknown_name_is_a_usage_error(capsys):
    assert cli.main(["weights", "fetch", "tiny"]) == 0
    assert "nothing to fetch" in capsys.readouterr().out
    assert cli.main(["weights", "fetch", "no-such-model"]) == 2
    assert "known models" in capsys.readouterr().err


def test_no_name_is_a_usage_error_of_the_subcommand(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["weights", "fetch"])
    assert ei.value.code == 2 and "wan-vace weights fetch" in capsys.readouterr().err


def test_verify_only_of_a_missing_folder_names_the_fetch_command(tmp_path, capsys):
    name = "wan2.1-vace-1.3b"
    assert cli.main(["weights", "fetch", name, "--weights-dir", str(tmp_path), "--verify-only"]) == 1
    err = capsys.readouterr().err
    assert "folder missing" in err and fetch_command(load_catalog()[name], tmp_path) in err


def test_several_names_in_one_call(tmp_path, capsys):
    # A manual entry (placed by the user) is reported, not fetched; tiny needs nothing.
    assert cli.main(["weights", "fetch", "tiny", "antelopev2", "--weights-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nothing to fetch" in out and "antelopev2" in out and "not in place" in out
