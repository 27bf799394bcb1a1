"""The documents stay true to the repository: docs/ARCHITECTURE.md names only
modules that exist, code cites docs/FORMATS.md by sections it has, and no
file points at notes outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "datasets_tools", "networks", "trainer", "gui", "tests", "docs", "bench",
            "presets")
# Spelled in pieces so that this file does not match itself.
OUTSIDE = ("shared" + "/docs", "STYLE" + ".md")
FORMATS = "FORMATS" + ".md"

_BACKTICKED = re.compile(r"`([^`\s]+)`")
_CITATION = re.compile(r"docs/FORMATS\.md,?\s+\"([^\"]+)\"")
_BARE = re.compile(r"(?<!docs/)\bFORMATS\.md")
_NUMBERED = re.compile(r"FORMATS\.md,? sections? \d")
# `trainer.lock`, `status.json`: a run folder's files, not dotted modules.
_FILE_NAME = re.compile(r"\.(lock|json|jsonl|toml|md|txt|png|safetensors)$")


def repository_files() -> list[Path]:
    """Tracked files and new ones not ignored, as they would be committed."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True, text=True).stdout
    return [REPO / name for name in listed.splitlines() if (REPO / name).is_file()]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary (images, model files)


def headings(markdown: str) -> set[str]:
    return {line.lstrip("#").strip() for line in markdown.splitlines() if line.startswith("#")}


def missing_modules(markdown: str) -> list[str]:
    """Backticked repository paths (`gui/jobs.py`) and dotted modules
    (`networks.base.AdapterModule`) of the project that do not exist."""
    missing = []
    for token in _BACKTICKED.findall(markdown):
        root = re.split(r"[/.]", token, maxsplit=1)[0]
        if root not in PACKAGES or token == root:
            continue
        if "/" in token:
            if not (REPO / token).exists():
                missing.append(token)
        elif not _FILE_NAME.search(token) and not _module_exists(token.split(".")):
            missing.append(token)
    return missing


def _module_exists(parts: list[str]) -> bool:
    """`a.b.C`: a/b.py or a/b/ exists (what follows may name something inside)."""
    path = REPO / parts[0]
    for part in parts[1:]:
        if (path / f"{part}.py").is_file():
            return True
        path = path / part
        if not path.is_dir():
            return False
    return path.is_dir()


def citation_problems(text: str, sections: set[str]) -> list[str]:
    cited = {" ".join(name.split()) for name in _CITATION.findall(text)}  # a wrapped line
    problems = [f"cites the unknown section {name!r}" for name in sorted(cited - sections)]
    problems += [f"{m.group(0)!r}: cite docs/FORMATS.md by section name"
                 for m in _NUMBERED.finditer(text)]
    problems += ["names FORMATS.md outside docs/" for _ in _BARE.finditer(text)]
    return problems


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in repository_files():
        text = text_of(path)
        if text is None or path.is_relative_to(REPO / "docs"):
            continue
        offenders += [f"{path.relative_to(REPO)}: {word}" for word in OUTSIDE if word in text]
    assert not offenders


def test_code_cites_formats_by_sections_it_has():
    sections = headings((REPO / "docs" / FORMATS).read_text())
    assert {"Module names", "Tensors and scales", "Metadata", "Hashes"} <= sections
    offenders = []
    for path in repository_files():
        text = text_of(path)
        # This file's own examples of bad citations are left out.
        if (text is None or path.is_relative_to(REPO / "docs") or FORMATS not in text
                or path == Path(__file__)):
            continue
        offenders += [f"{path.relative_to(REPO)}: {p}" for p in citation_problems(text, sections)]
    assert not offenders


def test_the_architecture_map_names_only_modules_that_exist():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    assert not missing_modules(text)
    # It covers every package and the layering test.
    for name in ("core/", "datasets_tools/", "networks/", "trainer/", "gui/",
                 "core/run_layout.py", "tests/test_layers.py"):
        assert f"`{name}" in text, name


def test_the_checks_catch_what_they_are_for():
    assert missing_modules("see `gui/jobs.py`, `core/nothing.py` and `trainer.nothing.x`, "
                           "`networks.base.AdapterModule`, `state/`, `x.py`, `trainer.lock`") == [
        "core/nothing.py", "trainer.nothing.x"]
    sections = {"Metadata"}
    assert citation_problems('docs/FORMATS.md "Metadata"; see docs/FORMATS.md', sections) == []
    assert len(citation_problems('docs/FORMATS.md "Hashes"', sections)) == 1
    assert len(citation_problems("(FORMATS.md section 5)", sections)) == 2
    assert len(citation_problems("docs/FORMATS.md section 7", sections)) == 1
