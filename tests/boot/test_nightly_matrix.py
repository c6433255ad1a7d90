"""A nightly-style run, for real: 3 kernels x 4 disk controllers, in parallel, with every report.

One pytest run in a subprocess (``-n 2``) boots each kernel from a root disk on each
controller (12 boots); one cell is made to fail on purpose (its root file system's init
crashes the kernel through sysrq). The run must leave the junit file, the JSON results and the
HTML report; the report is opened in a real headless browser (Debian's chromium), which must
show the failing cell with a working link to its console log; and the failure's reproduction
bundle, replayed with ``bootharness replay``, must end the same way.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.cache import cache_root
from harness.kernel.catalogue import load_catalogue
from harness.kernel.provision import provision

REPO = Path(__file__).resolve().parents[2]
KERNELS = ("debian-6.1-amd64", "debian-6.12-amd64", "debian-6.1-cloud-amd64")
CONTROLLERS = ("ide", "virtio-blk", "virtio-scsi", "nvme")
FORCED = ("debian-6.12-amd64", "nvme")  # the cell that fails on purpose

INNER_TEST = f"""
import pytest

from harness.storage import disks
from harness.image import rootfs
from harness.storage.controllers import Disk

FORCED = {FORCED!r}


def _tsc_khz():
    # Under a loaded TCG host the guest's own TSC calibration can come out 40x too low and
    # its clock then races ahead into false RCU-stall faults; tell it the host's rate.
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return None


def _image(factory, name, commands=()):
    folder = factory.mktemp(name)
    rootfs.build(folder / "root", commands=list(commands))
    return disks.filesystem(folder / "root", folder / f"{{name}}.img", label="bhroot", size="16M")


@pytest.fixture(scope="session")
def root_image(tmp_path_factory):
    return _image(tmp_path_factory, "root")


@pytest.fixture(scope="session")
def crashing_image(tmp_path_factory):
    return _image(tmp_path_factory, "crash", ["echo c > /proc/sysrq-trigger"])


def test_root_switch(boot, kernel, controller, template, request):
    forced = (kernel.name, controller.name) == FORCED
    image = request.getfixturevalue("crashing_image" if forced else "root_image")
    khz = _tsc_khz()
    vm = boot(
        template,
        disks=[Disk(image, controller)],
        variables={{"root": image.root()}},
        cmdline=f"tsc_early_khz={{khz}}" if khz else "",
    )
    vm.expect_pass()
    vm.wait_shutdown()


# A second test in the failing cell only: named to sort before the failure, which the page
# must still list first.
@pytest.mark.kernels(FORCED[0])
@pytest.mark.controllers(FORCED[1])
def test_a_boot_that_passes(boot, kernel, controller, template, root_image):
    khz = _tsc_khz()
    vm = boot(
        template,
        disks=[Disk(root_image, controller)],
        variables={{"root": root_image.root()}},
        cmdline=f"tsc_early_khz={{khz}}" if khz else "",
    )
    vm.expect_pass()
    vm.wait_shutdown()
"""


@dataclass
class Run:
    folder: Path
    out: Path
    process: subprocess.CompletedProcess[str]

    @property
    def results(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.out / "results.json").read_text())
        return data

    def test(self, kernel: str, controller: str) -> dict[str, object]:
        tests = self.results["tests"]
        assert isinstance(tests, list)
        return next(
            t
            for t in tests
            if (t["kernel"], t["controller"], t["test"]) == (kernel, controller, "test_root_switch")
        )


@pytest.fixture(scope="module")
def nightly(tmp_path_factory: pytest.TempPathFactory) -> Run:
    folder = tmp_path_factory.mktemp("nightly")
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "test_nightly.py").write_text(INNER_TEST)
    out = folder / "reports"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        "xdist",
        "-n",
        "2",
        f"--basetemp={folder / 'tmp'}",
        f"--kernels={REPO / 'kernels.toml'}",
        "--accel=tcg",
        *[f"--kernel={k}" for k in KERNELS],
        f"--controller={','.join(CONTROLLERS)}",
        f"--junitxml={out / 'junit.xml'}",
        f"--bootharness-json={out / 'results.json'}",
        f"--bootharness-html={out / 'report.html'}",
        f"--bootharness-bundles={out / 'bundles'}",
        "test_nightly.py",
    ]
    process = subprocess.run(
        argv, cwd=folder, capture_output=True, text=True, timeout=900, check=False
    )
    return Run(folder, out, process)


def test_nightly_run_writes_junit_json_and_html(nightly: Run) -> None:
    output = nightly.process.stdout + nightly.process.stderr
    assert nightly.process.returncode == pytest.ExitCode.TESTS_FAILED, output
    cases = ET.parse(nightly.out / "junit.xml").getroot().iter("testcase")
    props = {
        c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")} for c in cases
    }
    assert len(props) == len(KERNELS) * len(CONTROLLERS) + 1, output  # + the second test
    catalogue = load_catalogue(REPO / "kernels.toml")
    releases = {
        k: provision(catalogue.get(k), cache_root(), progress=False).release for k in KERNELS
    }
    for kernel in KERNELS:
        for controller in CONTROLLERS:
            name = f"test_root_switch[{kernel}-{controller}-init.sh]"
            got = props[name]
            expected = "KERNEL_FAULT" if (kernel, controller) == FORCED else "PASS"
            assert got["outcome"] == expected, (name, output)
            assert (got["kernel"], got["controller"], got["template"]) == (
                kernel,
                controller,
                "init.sh",
            )
            # The release the boot recorded is the one provisioning unpacked for that kernel.
            assert got["kernel_release"] == releases[kernel], (name, got)
            assert got["qemu_version"] and got["accelerator"] == "tcg"
            assert float(got["phase_kernel"]) > 0 and float(got["time_INIT-START"]) > 0
            if expected == "PASS":
                # The init phase is the time from /init to its marker, as the marks say.
                assert float(got["time_PASS"]) > float(got["time_INIT-START"])
                span = float(got["time_PASS"]) - float(got["time_INIT-START"])
                assert abs(float(got["phase_init"]) - span) < 0.01, got
    results = nightly.results
    assert results["summary"] == {"PASS": 12, "KERNEL_FAULT": 1}
    failed = nightly.test(*FORCED)
    assert "sysrq triggered crash" in str(failed["excerpt"])
    assert (nightly.out / str(failed["log"])).is_file()
    assert Path(str(failed["bundle"])).is_relative_to(nightly.out / "bundles")


class _Dom(HTMLParser):
    """Cells of the matrix table, their entries in the order shown, and the log links inside
    them, from chromium's DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str]] = []
        self.entries: list[tuple[int, dict[str, str]]] = []  # (cell index, attributes)
        self._cell: dict[str, str] | None = None
        self._in_commands = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "td" and "cell" in found.get("class", "").split():
            self._cell = found
            self.cells.append(found)
        elif tag == "div" and self._cell is not None and "entry" in found.get("class", ""):
            self.entries.append((len(self.cells) - 1, found))
        elif tag == "a" and self._cell is not None and "log" in found.get("class", ""):
            self._cell.setdefault("log", found["href"])
        self._in_commands = self._cell is not None and "commands" in found.get("class", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        self._in_commands = False

    def handle_data(self, data: str) -> None:
        if self._in_commands and self._cell is not None:
            self._cell["commands"] = self._cell.get("commands", "") + data


def _chromium_dom(url: str, profile: Path) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: apt-get install chromium (.ci/setup does)")
    argv = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_html_report_in_a_headless_browser_shows_the_failing_cell_and_its_log(
    nightly: Run, tmp_path: Path
) -> None:
    report = nightly.out / "report.html"
    dom = _Dom()
    dom.feed(_chromium_dom(report.as_uri(), tmp_path / "profile"))
    assert len(dom.cells) == len(KERNELS) * len(CONTROLLERS)
    failing = [c for c in dom.cells if "fail" in c["class"].split()]
    assert [(c["data-kernel"], c["data-column"]) for c in failing] == [(FORCED[0], FORCED[1])]
    assert failing[0]["data-outcome"] == "KERNEL_FAULT"
    link = failing[0]["log"]
    assert not link.startswith(("/", "file:", "http")), link  # relative: the folder moves
    # Follow the link as the browser would, from the report's own folder.
    log_dom = _chromium_dom((report.parent / link).resolve().as_uri(), tmp_path / "profile2")
    assert "Kernel panic - not syncing: sysrq triggered crash" in log_dom
    assert all(c.get("log") for c in dom.cells), "every cell links its console log"
    # How to reproduce it on a laptop: the replay command and the pytest command of the cell.
    failed = nightly.test(*FORCED)
    replay, rerun = failing[0]["commands"].splitlines()
    assert shlex.split(replay) == ["bootharness", "replay", str(failed["bundle"])]
    assert shlex.split(rerun)[:2] == ["pytest", failed["nodeid"]]
    assert all("commands" not in c for c in dom.cells if c is not failing[0])
    # Each entry's label carries its parameters (its id without the kernel, which the row
    # says); inside a cell failures come first, even before a test whose name sorts first.
    assert len(dom.entries) == len(KERNELS) * len(CONTROLLERS) + 1
    for index, entry in dom.entries:
        cell = dom.cells[index]
        test, params = entry["data-nodeid"].split("::")[1][:-1].split("[")
        assert params == f"{cell['data-kernel']}-{cell['data-column']}-init.sh"
        assert entry["data-label"] == f"{test}[{cell['data-column']}-init.sh]"
    forced = dom.cells.index(failing[0])
    shown = [
        (e["data-outcome"], e["data-label"].split("[")[0]) for i, e in dom.entries if i == forced
    ]
    assert shown == [("KERNEL_FAULT", "test_root_switch"), ("PASS", "test_a_boot_that_passes")]


def test_replayed_bundle_reproduces_the_original_outcome(nightly: Run, tmp_path: Path) -> None:
    where = Path(str(nightly.test(*FORCED)["bundle"]))
    recorded = json.loads((where / "bundle.json").read_text())
    assert recorded["outcome"] == "KERNEL_FAULT"
    assert recorded["disks"] and (where / recorded["disks"][0]["copy"]).is_file()
    assert (where / "initramfs.img").is_file() and (where / "console.log").is_file()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = ["bootharness", "--kernels", str(REPO / "kernels.toml"), "replay", str(where)]
    done = subprocess.run(
        [*command, "--workdir", str(tmp_path / "replay")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr  # KERNEL_FAULT's exit code
    assert "recorded: KERNEL_FAULT; replayed: KERNEL_FAULT (reproduced)" in done.stdout
    console = (tmp_path / "replay" / "console.log").read_text()
    assert "sysrq triggered crash" in console
    assert f"bootharness.nonce={recorded['nonce']}" in console  # the same boot, same nonce
