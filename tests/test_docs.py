"""The documentation says what the code has: the config reference in docs/config.md is the one
generated from pipemlaan/config.py, every relative link in the README and docs/ leads to a file
(and heading) that exists, the layout in docs/design.md names every source and test file, its
index names every [Note: ...] of the code, the README stays a short front door that shows
the two commands, and every command in a code block of the README or docs/ that starts
pipemlaan.train (directly or through launch/) parses: its --config file exists, its keys exist
and its values validate.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_docs.py -q
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipemlaan.config import load_config
from pipemlaan.errors import ConfigError
from pipemlaan.train import REGENERATE_CONFIG_DOC, main

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
HISTORY = REPO / "benchmarks" / "results" / "HISTORY.md"
PAGES = [README, *DOCS, HISTORY]
README_MAX_LINES = 210

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")      # [text](target), not images
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())              # commands in code blocks are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]   # http:, mailto:


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower().replace("`", "")).replace(" ", "-")
            out.add(slug)
    return out


def test_config_reference_is_the_generated_one(capsys):
    assert main(["--help-config", "--markdown"]) == 0
    generated = capsys.readouterr().out
    checked_in = (REPO / "docs" / "config.md").read_text()
    assert checked_in == generated, (
        f"docs/config.md is not what pipemlaan/config.py generates (a key or its help changed); "
        f"regenerate it from the repository root: OMP_NUM_THREADS=1 .venv/bin/{REGENERATE_CONFIG_DOC}")


def test_help_config_still_prints_the_plain_reference(capsys):
    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert "| `model.K` |" in out and "Generated from" not in out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_somewhere(page):
    assert page.exists(), f"{page.relative_to(REPO)} is missing"
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading in {dest.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {', '.join(broken)}"


def test_design_layout_names_every_source_and_test_file():
    text = (REPO / "docs" / "design.md").read_text()
    files = sorted(p.relative_to(REPO).as_posix()
                   for folder in ("pipemlaan", "tests", "benchmarks", "launch")
                   for p in (REPO / folder).rglob("*") if p.is_file()
                   and p.suffix in (".py", ".sh", ".sbatch", ".json")
                   and p.name != "__init__.py" and "__pycache__" not in p.parts
                   and "results" not in p.parts)
    missing = [f for f in files if f"`{f}`" not in text]
    assert not missing, f"docs/design.md's layout does not list: {', '.join(missing)}"


def test_design_indexes_every_note_of_the_code():
    notes = set()
    for p in (REPO / "pipemlaan").rglob("*.py"):
        # a name may break across lines, in a comment too: "[Note: stop\n    # agreement]"
        notes |= {re.sub(r"[\s#]+", " ", n).strip()
                  for n in re.findall(r"\[Note: ([^\]]+)\]", p.read_text())}
    text = (REPO / "docs" / "design.md").read_text()
    missing = sorted(n for n in notes if f"[Note: {n}]" not in text)
    assert not missing, f"docs/design.md's notes index lacks: {', '.join(missing)}"


def test_readme_is_a_short_front_door_with_the_two_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; keep it under {README_MAX_LINES} and move detail to docs/")


# ---- every command the docs show parses ------------------------------------------------------
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# what runs pipemlaan.train with a config and overrides after it: the module itself, and the
# launch scripts that hand their arguments on (NPROC first for the shell scripts)
LAUNCHERS = {"pipemlaan.train": 0, "launch/single_node.sh": 1, "launch/multi_node.sh": 1,
             "launch/slurm.sbatch": 0}


def _launcher(word: str) -> str | None:
    return next((k for k in LAUNCHERS if word == k or word.endswith("/" + k)
                 or (k.startswith("launch/") and word == k)), None)


def doc_commands() -> list[tuple[str, str]]:
    """(page, command) for every command in a README.md or docs/*.md code block that starts
    pipemlaan.train, directly or through a launch script (continued lines joined)."""
    out = []
    for page in [README, *DOCS]:
        for lang, block in BLOCK.findall(page.read_text()):
            if lang not in ("", "bash", "sh", "console"):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("#") or not any(_launcher(w) for w in line.split()):
                    continue
                out.append((page.relative_to(REPO).as_posix(), line))
    return out


def _train_args(command: str) -> tuple[str | None, list[str]]:
    """(config path, overrides) of one command, as pipemlaan.train would get them."""
    words = shlex.split(command)
    at = next(i for i, w in enumerate(words) if _launcher(w))
    kind = _launcher(words[at])
    rest = words[at + 1 + LAUNCHERS[kind]:]
    config, overrides = None, []
    if rest and not rest[0].startswith("--") and kind != "pipemlaan.train":
        config, rest = rest[0], rest[1:]       # the launch scripts: CONFIG then overrides
    it = iter(rest)
    for w in it:
        if w == "--config":
            config = next(it)
        elif w.startswith("--config="):
            config = w.split("=", 1)[1]
        elif w.startswith("--") and "." in w.split("=", 1)[0]:
            overrides.append(w)
        elif w in ("--help-config", "--markdown"):
            continue
        else:
            raise AssertionError(f"{command!r}: {w!r} is not an argument pipemlaan.train takes")
    return config, overrides


def test_the_docs_show_commands():
    pages = {p for p, _ in doc_commands()}
    assert len(doc_commands()) >= 15 and "README.md" in pages and "docs/distributed.md" in pages


@pytest.mark.parametrize("page,command", doc_commands(), ids=lambda v: v[:70])
def test_every_documented_command_parses(page, command):
    """The keys exist, the values validate (the config module's own parsing), the --config
    file exists; nothing is started."""
    config, overrides = _train_args(command)
    if any(o.startswith("--model.plugin=") for o in overrides):
        # the user's own backbone module (docs/backbones.md writes it out): every other key
        # is checked, on the default backbone
        overrides = [o for o in overrides if not o.startswith(("--model.plugin=",
                                                                "--model.name="))]
    if config is not None:
        assert (REPO / config).is_file(), f"{page}: {command!r}: no file {config}"
    try:
        load_config(REPO / config if config else None, overrides)
    except ConfigError as e:
        raise AssertionError(f"{page}: {command!r}: {e}") from None
