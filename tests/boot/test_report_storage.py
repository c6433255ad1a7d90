"""The storage run of a nightly maintainer, for real, rendered: one column per controller.

A slice of ``tests/boot/test_storage.py`` runs in a subprocess exactly as a maintainer runs it
(``--kernel debian-6.1-amd64 --controller ahci,nvme,ide``, xdist, every report): the
controller-matrix test on ahci, nvme and ide (it picks its controller through a parameter of
its own, not the ``controller`` fixture), the two-disk test (ahci + nvme) and a test that
boots nothing. Every record must name the controllers its VM really booted, in the JSON and
in junit, and the page must have one column per controller with every entry named by its
parameters and its duration apart from its name.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SWITCH = "test_switch_root_on_every_controller"
TWO = "test_two_disks_on_two_controllers_both_appear"
NONE = "test_controller_a_kernel_lacks_is_skipped_with_the_reason"
SELECTION = f"{SWITCH} and (ahci or nvme or ide) or {TWO} or {NONE}"
EXPECTED = {  # test name -> the controllers its VM booted
    f"{SWITCH}[debian-6.1-amd64-ide]": "ide",
    f"{SWITCH}[debian-6.1-amd64-ahci]": "ahci",
    f"{SWITCH}[debian-6.1-amd64-nvme]": "nvme",
    f"{TWO}[debian-6.1-amd64]": "ahci+nvme",
    f"{NONE}[debian-6.1-amd64]": "",  # boots nothing: no disk
}


class _Matrix(HTMLParser):
    """Column headings and entries (attributes, label text up to the first block)."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.entries: list[dict[str, str]] = []
        self._in_heading = False
        self._entry: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "th" and "data-column" in found:
            self._in_heading = True
            self.headings.append("")
        elif tag == "div" and "entry" in found.get("class", "").split():
            self._entry = {**found, "text": ""}
            self.entries.append(self._entry)
        elif tag in ("div", "details"):
            self._entry = None  # the label line is over

    def handle_endtag(self, tag: str) -> None:
        if tag == "th":
            self._in_heading = False
        if tag == "div":
            self._entry = None

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self.headings[-1] += data
        if self._entry is not None:
            self._entry["text"] += data


@pytest.fixture(scope="module")
def storage_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("storage-run")
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(REPO / "tests" / "boot" / "test_storage.py"),
        "-k",
        SELECTION,
        "--kernel",
        "debian-6.1-amd64",
        "--controller",
        "ahci,nvme,ide",
        f"--kernels={REPO / 'kernels.toml'}",
        f"--bootharness-html={out / 'report.html'}",
        f"--bootharness-json={out / 'results.json'}",
        f"--junitxml={out / 'junit.xml'}",
        f"--basetemp={out / 'tmp'}",
        "-p",
        "xdist",
        "-n",
        "1",
        "-p",
        "no:cacheprovider",
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_every_storage_record_names_the_controllers_its_vm_booted(storage_run: Path) -> None:
    tests = json.loads((storage_run / "results.json").read_text())["tests"]
    found = {t["nodeid"].split("::")[1]: t for t in tests}
    assert {name: t["controller"] for name, t in found.items()} == EXPECTED
    for name, test in found.items():
        booted = bool(EXPECTED[name])
        assert test["template"] == ("init.sh" if booted else "")
        assert (test["boot_path"], test["initramfs"]) == ("pvh", "ours")
        assert test["release"] == ("6.1.0-56-amd64" if booted else "")
    cases = ET.parse(storage_run / "junit.xml").getroot().iter("testcase")
    junit = {
        c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")} for c in cases
    }
    for name, controllers in EXPECTED.items():
        assert junit[name].get("controller", "") == controllers, name


def test_storage_page_has_one_column_per_controller_and_labelled_entries(
    storage_run: Path,
) -> None:
    page = _Matrix()
    page.feed((storage_run / "report.html").read_text())
    assert sorted(page.headings) == sorted(["ide", "ahci", "nvme", "(no disk)"])
    labels = {e["data-nodeid"].split("::")[1]: e for e in page.entries}
    assert set(labels) == set(EXPECTED)
    for controller in ("ide", "ahci", "nvme"):
        entry = labels[f"{SWITCH}[debian-6.1-amd64-{controller}]"]
        assert entry["data-label"] == f"{SWITCH}[{controller}]"
        assert entry["data-controller"] == controller
    two = labels[f"{TWO}[debian-6.1-amd64]"]
    assert two["data-label"] == f"{TWO} ahci+nvme"  # in the ahci column, naming both
    for entry in page.entries:
        # "<label> 12.3 s": the duration is a word of its own, never glued to the name.
        words = " ".join(entry["text"].split()).rsplit(" ", 2)
        assert words[-1] == "s" and float(words[-2]) >= 0, entry["text"]
        assert words[0].endswith(entry["data-label"]), (words, entry["data-label"])
