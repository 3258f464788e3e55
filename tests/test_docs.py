"""Every document the repository cites exists in the repository, with the cited section.

The checker reads the repository's .py, .md and .ipynb files (the cells' sources) and
finds every reference to a markdown document: a path such as ``docs/DESIGN.md`` or
``figures/README.md``, the target of a markdown link, or a bare file name. A reference
must resolve, relative to the repository root or to the citing file, to a file inside
the repository. The design document is cited by its path, ``docs/DESIGN.md``, never by
its bare name. A section cited in the form ``docs/DESIGN.md, "The package"`` must be a
heading of that document.
"""

import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".ipynb")
SKIP_DIRS = {
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".ipynb_checkpoints",
    "build",
    "dist",
    "runs",
}
DESIGN = "docs/DESIGN.md"

# A path-like token ending in ".md": letters, digits, _ . / - (and ":" to catch URLs,
# which are skipped). It must start where no such character precedes it.
_PATH = r"(?<![\w./:-])([\w./:-]*\w\.md)(?!\w)"
REFERENCE = re.compile(_PATH)
# The same token, then optionally the rest of a markdown link (`PATH`](PATH)), then
# , "Section": a cited section.
SECTION = re.compile(_PATH + r"`?(?:\]\([^)\s]*\))?,\s*\"([^\"\n]+)\"")
HEADING = re.compile(r"#{1,6}\s+(.+?)\s*#*\s*")


def repository_files(root: Path) -> list[Path]:
    """The .py, .md and .ipynb files under ``root``, build and tool folders left out."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(
            d for d in subfolders if d not in SKIP_DIRS and not d.endswith(".egg-info")
        )
        found += [Path(folder) / f for f in sorted(files) if f.endswith(SUFFIXES)]
    return found


def texts(path: Path) -> list[tuple[str, str]]:
    """(where, text) pieces of a file: the whole file, or each notebook cell's source."""
    if path.suffix != ".ipynb":
        return [("", path.read_text(encoding="utf-8"))]
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    pieces = []
    for i, cell in enumerate(cells):
        source = cell.get("source", "")
        pieces.append((f"cell {i}, ", "".join(source) if isinstance(source, list) else source))
    return pieces


def headings(document: Path) -> set[str]:
    """The text of every markdown heading in ``document``, code blocks left out."""
    found, fenced = set(), False
    for line in document.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := HEADING.fullmatch(line)):
            found.add(m.group(1))
    return found


def resolve(root: Path, citing: Path, reference: str) -> Path | None:
    """The file ``reference`` names, relative to the root or to the citing file's folder;
    None when it names nothing inside the repository (an absolute path never does)."""
    if reference.startswith("/"):
        return None
    root = root.resolve()
    for base in (root, citing.parent):
        candidate = (base / reference).resolve()
        if candidate.is_file() and candidate.is_relative_to(root):
            return candidate
    return None


def _problems_in(root: Path, path: Path, where: str, text: str) -> list[str]:
    """The bad references in one piece of text of ``path`` (see :func:`bad_references`)."""
    problems = []

    rel = path.relative_to(root).as_posix()

    def at(offset: int) -> str:
        line = text.count("\n", 0, offset) + 1
        return f"{rel}:{where}line {line}"

    for m in REFERENCE.finditer(text):
        reference = m.group(1)
        if "://" in reference:  # a web address, not a file of ours
            continue
        if reference.split("/")[-1] == Path(DESIGN).name and not reference.endswith(DESIGN):
            problems.append(f"{at(m.start())}: {reference!r}: cite it as {DESIGN}")
        elif resolve(root, path, reference) is None:
            problems.append(f"{at(m.start())}: {reference!r}: no such file in the repo")
    for m in SECTION.finditer(text):
        reference, section = m.group(1), m.group(2)
        document = None if "://" in reference else resolve(root, path, reference)
        if document is not None and section not in headings(document):
            problems.append(f"{at(m.start())}: {reference}, {section!r}: no such heading there")
    return problems


def bad_references(root: Path) -> list[str]:
    """One line per reference that does not hold: "FILE:LINE: what is wrong"."""
    problems = []
    for path in repository_files(root):
        for where, text in texts(path):
            problems += _problems_in(root, path, where, text)
    return problems


def test_every_cited_document_and_section_exists():
    problems = bad_references(ROOT)
    assert not problems, "\n".join(problems)


def test_the_design_document_is_in_the_repository():
    """The document the code cites is the repository's own, with its sections."""
    assert (ROOT / DESIGN).is_file(), f"{DESIGN} is missing"
    sections = headings(ROOT / DESIGN)
    for section in ("The package", "Parameter names", "LoRA math", "Public API"):
        assert section in sections


def test_the_checker_finds_each_kind_of_bad_reference(tmp_path):
    """Planted references: each bad kind is reported once, the good ones not at all."""
    repo, md = tmp_path / "repo", ".md"  # names are built here, so this file cites nothing
    (repo / "docs").mkdir(parents=True)
    (repo / "pkg").mkdir()
    (repo / ".venv").mkdir()
    (repo / "docs" / f"DESIGN{md}").write_text("# Design\n\n## Real section\n```\n# Fake\n```\n")
    (repo / "pkg" / f"notes{md}").write_text("nothing\n")
    (tmp_path / f"outside{md}").write_text("a file that exists, outside the repository\n")
    good = (
        f'"""See docs/DESIGN{md}, "Real section", and notes{md} next to this file,\n'
        f'[the docs](docs/DESIGN{md}), and https://example.com/x/GONE{md}."""\n'
    )
    (repo / "pkg" / "good.py").write_text(good)
    (repo / ".venv" / "skipped.py").write_text(f"# GONE{md}\n")
    (repo / "pkg" / "bad.py").write_text(
        f"# the bare name: DESIGN{md}\n"
        f'# a missing section: docs/DESIGN{md}, "Fake"\n'
        f"# a missing file: docs/GONE{md}\n"
        f"# outside the repository: ../../outside{md} and /etc/x{md}\n"
    )
    (repo / f"README{md}").write_text(f"A link to [a missing page](pkg/GONE{md}).\n")
    cell = {"cell_type": "markdown", "metadata": {}, "source": ["intro\n", f"see MISSING{md}\n"]}
    notebook = {"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (repo / "pkg" / "lesson.ipynb").write_text(json.dumps(notebook))

    problems = bad_references(repo)

    expected = [
        ("README", "pkg/GONE", "no such file"),
        ("pkg/bad.py:line 1", f"'DESIGN{md}'", f"cite it as {DESIGN}"),
        ("pkg/bad.py:line 2", "'Fake'", "no such heading"),
        ("pkg/bad.py:line 3", "docs/GONE", "no such file"),
        ("pkg/bad.py:line 4", "../../outside", "no such file"),
        ("pkg/bad.py:line 4", "/etc/x", "no such file"),
        ("pkg/lesson.ipynb:cell 0, line 2", "MISSING", "no such file"),
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, parts in zip(sorted(problems), expected, strict=True):
        assert all(part in problem for part in parts), (problem, parts)
