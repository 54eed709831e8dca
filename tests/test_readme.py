"""The README documents every setting, and CI runs the README's test command."""

from pathlib import Path

from bot.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme_configuration_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [n for n in Settings.model_fields if f"TUTORBOT_{n.upper()}" not in readme]
    assert missing == [], f"settings missing from README's configuration table: {missing}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
