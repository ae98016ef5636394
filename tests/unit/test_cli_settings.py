"""`wan-vace settings`: each setting's value and its source (flag, environment, .env, default),
and secrets masked."""

from __future__ import annotations

import json

import pytest
from pydantic_settings import SettingsConfigDict

from server import cli, provenance
from server.settings import Settings


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.upper().startswith("WAN_VACE_"):
            monkeypatch.delenv(k)
    return monkeypatch


def _rows(capsys, *argv) -> dict[str, dict]:
    assert cli.main(["settings", "--json", *argv]) == 0
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)}


def test_sources_flag_environment_default(clean_env, capsys, tmp_path):
    clean_env.setenv("WAN_VACE_PORT", "9123")
    clean_env.setenv("wan_vace_lease_seconds", "7")  # matched case-insensitively, as Settings does
    clean_env.setenv("WAN_VACE_LOG_LEVEL", "error")
    rows = _rows(capsys, "--log-level", "debug", "--data-dir", str(tmp_path))
    assert rows["port"] == {"name": "port", "variable": "WAN_VACE_PORT", "value": 9123, "source": "environment"}
    assert rows["lease_seconds"]["value"] == 7.0 and rows["lease_seconds"]["source"] == "environment"
    # The flag wins over the environment, and says so.
    assert rows["log_level"]["value"] == "debug" and rows["log_level"]["source"] == "flag"
    assert rows["data_dir"]["value"] == str(tmp_path) and rows["data_dir"]["source"] == "flag"
    assert rows["max_queue"]["value"] == 1000 and rows["max_queue"]["source"] == "default"
    assert set(rows) == set(Settings.model_fields)  # every setting, none left out


def test_secrets_are_masked(clean_env, capsys):
    clean_env.setenv("WAN_VACE_API_KEYS", "wvk_first_secret_1111,wvk_second_secret_2222")
    clean_env.setenv("WAN_VACE_DATABASE_URL", "postgresql://wan:hunter2@db:5432/wan")
    rows = _rows(capsys)
    assert rows["api_keys"]["value"] == ["****1111", "****2222"]
    assert rows["database_url"]["value"] == "postgresql://wan:****@db:5432/wan"
    assert cli.main(["settings"]) == 0
    text = capsys.readouterr().out
    assert "secret" not in text and "hunter2" not in text
    assert "WAN_VACE_API_KEYS" in text and "****2222" in text


def test_no_key_set_says_which_key_file_is_used(clean_env, capsys, tmp_path):
    assert cli.main(["settings", "--data-dir", str(tmp_path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("WAN_VACE_API_KEYS"))
    assert str(tmp_path / "api_key") in line
    assert not (tmp_path / "api_key").exists()  # printing settings generates no key


def test_a_dotenv_file_is_reported_as_the_source(clean_env, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("WAN_VACE_WORKERS=3\nWAN_VACE_PORT=9000\n")

    class FromDotenv(Settings):
        model_config = SettingsConfigDict(env_prefix="WAN_VACE_", extra="ignore", env_file=env_file)

    clean_env.setenv("WAN_VACE_PORT", "9500")  # the environment wins over the file
    s = FromDotenv()
    rows = {r["name"]: r for r in provenance.report(s, {})}
    assert (rows["workers"]["value"], rows["workers"]["source"]) == (3, ".env")
    assert (rows["port"]["value"], rows["port"]["source"]) == (9500, "environment")
    assert rows["host"]["source"] == "default"


def test_a_bad_variable_is_a_usage_error(clean_env, capsys):
    clean_env.setenv("WAN_VACE_PORT", "not-a-port")
    with pytest.raises(SystemExit) as ei:
        cli.main(["settings"])
    assert ei.value.code == 2 and "port" in capsys.readouterr().err
