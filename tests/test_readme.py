from __future__ import annotations

import re
from pathlib import Path

from worldmodel.config import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", re.S)


def test_readme_config_reference_is_current() -> None:
    match = BLOCK.search(README.read_text())
    assert match, "README.md lost its config-reference markers"
    assert match.group(1) == config_reference(), (
        "README config reference is stale: regenerate it with `python tests/test_readme.py`"
    )


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block


def regenerate() -> None:
    text = README.read_text()
    new = BLOCK.sub(
        lambda _: f"<!-- config-reference:start -->\n{config_reference()}"
        "<!-- config-reference:end -->",
        text,
    )
    README.write_text(new)


if __name__ == "__main__":
    regenerate()
