"""The project documents itself: every repository path the README and docs/ cite exists, and
none of them points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP_LEVEL = (
    "harness/",
    "tests/",
    "bench/",
    "docs/",
    "examples/",
    ".ci/",
    ".github/",
    "initrd_templates/",
    "kernels.toml",
    "conftest.py",
    "tox.ini",
    "pyproject.toml",
    "README.md",
)
CODE_SPAN = re.compile(r"`([^`\s]+)`")


def cited_paths(text: str) -> list[str]:
    """Code spans that name a file or folder of this repository."""
    paths = []
    for span in CODE_SPAN.findall(text):
        candidate = span.rstrip(".,:;)").split(":", 1)[0].split("::", 1)[0]
        if candidate.startswith(TOP_LEVEL) and re.fullmatch(r"[\w./-]+", candidate):
            paths.append(candidate)
    return paths


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_cited_path_exists(doc: Path) -> None:
    text = doc.read_text()
    cited = cited_paths(text)
    assert cited, f"{doc.name} cites no repository path at all: is the pattern still right?"
    missing = [path for path in cited if not (REPO / path).exists()]
    assert not missing, f"{doc.name} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_no_path_outside_the_repository(doc: Path) -> None:
    outside = [s for s in CODE_SPAN.findall(doc.read_text()) if s.startswith("../")]
    assert not outside, f"{doc.name} cites files outside the repository: {outside}"


def test_the_checker_sees_a_missing_path() -> None:
    assert cited_paths("see `harness/nowhere.py` and `/dev/kvm`") == ["harness/nowhere.py"]
