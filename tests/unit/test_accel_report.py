"""The nightly page says which accelerator each job used: one word when all used the same,
by kernel when the jobs ran on runners with and without /dev/kvm."""

from __future__ import annotations

import json
from pathlib import Path

from harness.report import html, merge
from harness.report.model import TestRecord
from tests.unit.test_history_merge import write_job


def record(kernel: str, accel: str) -> TestRecord:
    return TestRecord(nodeid=f"t.py::t[{kernel}]", test="t", kernel=kernel, accelerator=accel)


def test_one_accelerator_is_one_word() -> None:
    assert html.accelerators([record("a", "kvm"), record("b", "kvm")]) == "accel kvm"
    assert html.accelerators([record("a", "")]) == ""


def test_mixed_accelerators_are_listed_by_kernel() -> None:
    records = [record("b", "kvm"), record("a", "kvm"), record("c", "tcg"), record("a", "kvm")]
    assert html.accelerators(records) == "accel kvm: a, b; tcg: c"


def test_a_merged_page_names_each_jobs_accelerator(tmp_path: Path) -> None:
    inputs = []
    for kernel, accel in (("debian-6.1", "kvm"), ("debian-6.12", "tcg")):
        path = write_job(tmp_path / kernel, kernel, {"ahci": "PASS"})
        data = json.loads(path.read_text())
        for test in data["tests"]:
            test["accelerator"] = accel
        path.write_text(json.dumps(data))
        inputs.append(path)
    merged = merge.merge(inputs, tmp_path / "page-logs")
    merge.write(merged, tmp_path / "page.html", None, [])
    assert "accel kvm: debian-6.1; tcg: debian-6.12" in (tmp_path / "page.html").read_text()
