"""The README stays true: its first lines are the two set-up commands, and its settings table lists every setting."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def settings_table() -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `--{name.replace('_', '-')}` | `STOMPGATE_{name.upper()}` | `{field.default}` | {field.description} |")
    return "\n".join(rows)


def test_first_lines_are_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    block = lines[lines.index("```sh") + 1 : lines.index("```sh") + 3]
    assert block[0].startswith("make serve")
    assert block[1].startswith("make test")


def test_settings_table_matches_the_settings() -> None:
    text = README.read_text()
    start = text.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end].strip() == settings_table(), "regenerate with: python -m tests.test_readme"


if __name__ == "__main__":
    text = README.read_text()
    start = text.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = text.index("<!-- settings-table:end -->")
    README.write_text(text[:start] + "\n" + settings_table() + "\n" + text[end:])
