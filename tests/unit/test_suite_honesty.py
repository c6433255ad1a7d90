"""The suite keeps itself honest (docs/testing.md): no test asserts an upper bound on an elapsed
time. Speed goals are figures the benches print; a loaded CI machine must not fail a test for
being slow. Lower bounds ("not before the deadline") are behaviour and stay."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
TIMEY = re.compile(
    r"elapsed|waited|took|duration|seconds|boot_time|monotonic\(\)|perf_counter|\.at\b"
)


def upper_bounds_on_time(source: str) -> list[str]:
    """``assert`` comparisons that cap a time: ``t < x``, ``t <= x``, ``x > t``, ``x >= t``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assert):
            continue
        for compare in ast.walk(node.test):
            if not isinstance(compare, ast.Compare):
                continue
            operands = [compare.left, *compare.comparators]
            for index, op in enumerate(compare.ops):
                smaller = operands[index] if isinstance(op, ast.Lt | ast.LtE) else None
                if isinstance(op, ast.Gt | ast.GtE):
                    smaller = operands[index + 1]
                text = ast.get_source_segment(source, smaller) if smaller is not None else None
                if text and TIMEY.search(text):
                    found.append(f"line {node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_no_test_asserts_an_upper_bound_on_elapsed_time() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for hit in upper_bounds_on_time(path.read_text()):
            offenders.append(f"{path.relative_to(TESTS.parent)} {hit}")
    assert not offenders, "move these speed goals into bench/:\n" + "\n".join(offenders)


def test_the_check_finds_upper_bounds_and_leaves_lower_bounds() -> None:
    assert upper_bounds_on_time("assert elapsed < 2.0\n")
    assert upper_bounds_on_time("assert 1.0 <= waited < 3.0\n")
    assert upper_bounds_on_time("assert 10 > time.monotonic() - started\n")
    assert not upper_bounds_on_time("assert waited >= deadline\n")
    assert not upper_bounds_on_time("assert len(lines) < 3\n")
