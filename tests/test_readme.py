"""The README's config reference is the one the code documents, key for key.

Run: .venv/bin/python -m pytest tests/test_readme.py -q
"""

from pathlib import Path

from pipemlaan.config import describe

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_config_reference_matches_the_code():
    text = README.read_text()
    for line in describe().splitlines():
        if line.startswith("| `"):
            assert line in text, f"README config reference is stale: {line}"


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text
