"""Dimensions from the VM, the page that shows them, history across new ids, terminal tables.

No VM boots here: the VMs are built and never launched (their dimensions come from what they
were made with), and the nightly results are written the way CI jobs write them.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.bisect.search import BisectResult, Observation, Status, Step
from harness.cli import text
from harness.cli.main import main
from harness.cli.progress import ERASE, BootProgress
from harness.image.initramfs import InitramfsSpec
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError, Outcome
from harness.report import history, html, view
from harness.report.model import Results, TestRecord, junit_properties
from harness.storage import attach, disks
from harness.storage.controllers import Disk
from harness.vm.boot import BootRequest, Vm, declared_dimensions
from harness.vm.console import Mark
from harness.vm.dimensions import FOREIGN, NAMES, Dimensions, warning_line
from harness.vm.machine import MachineSpec

KERNELS = {
    "debian-6.1-amd64": ("6.1.0-56-amd64", "", ""),
    "debian-6.12-amd64": ("6.12.117+deb12-amd64", "", ""),
    "src-6.1-min": ("6.1.158", "3f2a9c1d7e4b", "a1b2c3d4e5f6"),
}
PATHS = ("pvh", "bios-grub")
INITRAMFS = (("ours", "init.sh", "", ""), (FOREIGN, "", "dracut", "9c8b7a6d5e4f"))
WARNING = "WARNING: CPU: 0 PID: 1 at drivers/nvme/host/core.c:1234 nvme_setup_cmd+0x5a/0x80"


# -- dimensions come from the VM -------------------------------------------------------------


def _kernel(tmp_path: Path, **extra: str) -> Kernel:
    return Kernel("k-src", "6.1.158", tmp_path / "vmlinuz", None, None, None, **extra)  # type: ignore[arg-type]


def test_a_vm_reports_its_kernel_disks_and_declared_dimensions(tmp_path: Path) -> None:
    images = [disks.empty(tmp_path / f"d{i}.qcow2", "1M") for i in range(3)]
    storage = replace(
        attach.plan([Disk(images[0], "ahci"), Disk(images[1], "nvme"), Disk(images[2], "ahci")]),
        layout="lvm",
    )
    kernel = _kernel(tmp_path, commit="3f2a9c1d7e4b", config_digest="a1b2c3d4e5f6")
    request = BootRequest(kernel, InitramfsSpec(template="init.sh.j2"), storage=storage)
    declared = replace(declared_dimensions(request), boot_path="bios-grub")
    vm = Vm(
        MachineSpec(kernel=kernel.vmlinuz),
        tmp_path / "vm",
        nonce="0",
        kernel=kernel,
        storage=storage,
        dimensions=declared,
    )
    assert vm.dimensions() == Dimensions(
        kernel="k-src",
        release="6.1.158",
        kernel_commit="3f2a9c1d7e4b",
        kernel_config="a1b2c3d4e5f6",
        controller="ahci+nvme",  # the boot disk's first, each model once
        boot_path="bios-grub",
        initramfs="ours",
        template="init.sh",
        layout="lvm",
    )


def test_a_vm_nobody_described_reports_the_safe_defaults(tmp_path: Path) -> None:
    vm = Vm(MachineSpec(kernel=tmp_path / "k"), tmp_path / "vm", nonce="0")
    found = vm.dimensions()
    assert (found.boot_path, found.initramfs, found.controller, found.layout) == (
        "pvh",
        "ours",
        "",
        "",
    )
    assert found.kernel_warnings == ()


def test_warning_lines_lose_their_time_stamp() -> None:
    assert warning_line(f"[    3.141593] {WARNING}\r") == WARNING


def test_records_carry_every_dimension_into_json_and_junit_under_the_same_names() -> None:
    dims = Dimensions(
        kernel="src-6.1-min",
        release="6.1.158",
        kernel_commit="3f2a9c1d7e4b",
        kernel_config="a1b2c3d4e5f6",
        controller="ahci+nvme",
        boot_path="uefi-stub",
        initramfs=FOREIGN,
        initramfs_digest="9c8b7a6d5e4f",
        generator="dracut",
        layout="gpt+luks",
        kernel_warnings=(WARNING, WARNING.replace("1234", "99")),
    )
    record = TestRecord("t.py::test_x[src-6.1-min]", "test_x")
    record.set_dimensions(dims)
    assert record.dimensions() == dims
    data = json.loads(Results([record]).to_json())["tests"][0]
    assert {name: data[name] for name in NAMES} == dims.as_dict()
    props = dict(junit_properties(record))
    for name in NAMES:
        if name == "kernel_warnings":
            assert props[name].splitlines() == list(dims.kernel_warnings)
        elif name == "release":  # junit's name for it since the first reports
            assert props["kernel_release"] == dims.release
        elif name != "template":  # empty values are left out
            assert props[name] == getattr(dims, name), name
    # An old results file (no dimension fields) loads with the defaults.
    old = TestRecord.from_dict({"nodeid": "t.py::test_x[k]", "test": "test_x", "kernel": "k"})
    assert (old.boot_path, old.initramfs, old.kernel_warnings) == ("pvh", "ours", [])


# -- the page: columns, labels, order ---------------------------------------------------------


def _nightly_record(
    kernel: str, path: str, kind: tuple[str, str, str, str], ctl: str
) -> TestRecord:
    release, commit, config = KERNELS[kernel]
    initramfs, template, generator, digest = kind
    ids = [kernel, ctl, path, generator or template]
    outcome, message, excerpt, trace = "PASS", "", "", ""
    if kernel == "src-6.1-min" and path == "bios-grub" and initramfs == FOREIGN:
        outcome, message = "KERNEL_FAULT", "kernel fault: panic: VFS: Unable to mount root fs"
        excerpt = "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs"
        trace = "mount_root+0x12/0x40 init/do_mounts.c:432"
    if kernel == "debian-6.1-amd64" and (path, ctl, initramfs) == ("pvh", "ahci", FOREIGN):
        outcome, message = "TEST_FAIL", "root failure: Gave up waiting for root file system device"
    first = 0.15 if path == "pvh" else 2.6
    boot = 1.5 if path == "pvh" else 4.2
    phases = {"first-byte": first, "INIT-START": first + boot}
    if outcome == "PASS":
        phases |= {"PASS": first + boot + 0.4, "shutdown": first + boot + 0.6}
    warned = kernel == "debian-6.12-amd64" and ctl == "nvme" and initramfs == "ours"
    return TestRecord(
        nodeid=f"tests/boot/test_nightly.py::test_boot[{'-'.join(ids)}]",
        test="test_boot",
        kernel=kernel,
        release=release,
        kernel_commit=commit,
        kernel_config=config,
        controller=ctl,
        boot_path=path,
        initramfs=initramfs,
        template=template,
        initramfs_digest=digest,
        generator=generator,
        kernel_warnings=[WARNING] if warned else [],
        params="-".join(ids),
        outcome=outcome,
        message=message,
        excerpt=excerpt,
        trace=trace,
        duration=round(phases.get("shutdown", 5.0) + 0.5, 3),
        phases=phases,
        qemu_version="7.2.22",
        accelerator="tcg",
    )


def _night(created: str, kernel: str, host: str) -> Results:
    records = [
        _nightly_record(kernel, path, kind, ctl)
        for path in PATHS
        for kind in INITRAMFS
        for ctl in ("ahci", "nvme")
    ]
    return Results(records, created, host, 60.0)


class _Page(HTMLParser):
    """Matrix headings, cells with their entries (attributes and text), overview rows."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.cells: list[dict[str, str]] = []
        self.entries: list[dict[str, str]] = []  # attributes + "text" + "cell" index
        self.overview: dict[str, list[str]] = {}
        self.bars: list[dict[str, str]] = []
        self.groups = 0
        self._entry: dict[str, str] | None = None
        self._depth = 0
        self._heading = False
        self._row = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        classes = found.get("class", "").split()
        if tag == "th" and "data-column" in found:
            self._heading = True
            self.headings.append("")
        elif tag == "td" and "cell" in classes:
            self.cells.append(found)
        elif tag == "div" and "entry" in classes:
            self._entry = {**found, "text": "", "cell": str(len(self.cells) - 1)}
            self.entries.append(self._entry)
            self._depth = 0
        elif tag in ("div", "details") and self._entry is not None:
            self._depth += 1
            self._entry["line-done"] = "yes"  # the label line ends where a block starts
        elif tag == "tr" and "data-dimension" in found:
            self._row = found["data-dimension"]
            self.overview[self._row] = []
        elif tag == "span" and self._row and "data-value" in found:
            self.overview[self._row].append(found["data-value"])
        elif tag == "rect" and "phase" in classes:
            self.bars.append(found)
        elif tag == "details" and "group" in classes:
            self.groups += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "th":
            self._heading = False
        elif tag in ("div", "details") and self._entry is not None:
            if self._depth == 0:
                self._entry = None
            else:
                self._depth -= 1
        elif tag == "tr":
            self._row = ""

    def handle_data(self, data: str) -> None:
        if self._heading:
            self.headings[-1] += data
        if self._entry is not None and "line-done" not in self._entry:
            self._entry["text"] += data


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def test_columns_follow_the_most_varied_dimension_or_the_chosen_one() -> None:
    records = [_nightly_record("debian-6.1-amd64", p, k, "ahci") for p in PATHS for k in INITRAMFS]
    records += [
        _nightly_record("debian-6.1-amd64", "pvh", INITRAMFS[0], c) for c in ("ide", "nvme")
    ]
    assert view.column_dimension(records) == "controller"  # 3 controllers, 2 paths, 2 kinds
    page = _parse(html.render(Results(records), {}, columns="boot_path"))
    assert page.headings == ["pvh", "bios-grub"]
    with pytest.raises(ConfigError, match="report columns 'colour'"):
        view.column_dimension(records, "colour")


def test_every_entry_is_labelled_with_its_parameters_and_duration_failures_first() -> None:
    night = _night("2026-11-29T02:00:00+00:00", "src-6.1-min", "ci")
    page = _parse(html.render(night, {}))
    assert page.headings == ["ahci", "nvme"]
    for entry in page.entries:
        record = next(r for r in night.records if r.nodeid == entry["data-nodeid"])
        own = record.param_id.removeprefix("src-6.1-min-")
        assert entry["data-label"].startswith(f"test_boot[{own}]")
        assert entry["data-initramfs"] == ("foreign dracut" if "dracut" in own else "ours init.sh")
        # The duration stands apart from the name: "… 6.1 s", never "…]6.1 s".
        assert re.search(rf"\] (.+ )?{record.duration:.1f} s$", entry["text"].strip()), entry
    for index in range(len(page.cells)):
        ranks = [view.rank(e["data-outcome"]) for e in page.entries if e["cell"] == str(index)]
        assert ranks == sorted(ranks) and ranks[0] == view.rank("KERNEL_FAULT")


def test_a_crowded_cell_folds_its_passing_entries_but_never_a_failure() -> None:
    records = [
        replace(
            _nightly_record("debian-6.1-amd64", "pvh", INITRAMFS[0], "nvme"),
            nodeid=f"t.py::test_many[debian-6.1-amd64-{n}]",
            test="test_many",
            params=f"debian-6.1-amd64-{n}",
            outcome="BOOT_TIMEOUT" if n == 7 else "PASS",
        )
        for n in range(html.COLLAPSE_AT + 3)
    ]
    page = html.render(Results(records), {})
    assert _parse(page).groups == 1
    folded = page[page.index('<details class="group">') :]
    assert 'data-outcome="BOOT_TIMEOUT"' not in folded
    assert f"<summary>{html.COLLAPSE_AT + 2} PASS</summary>" in folded


# -- the merged nightly: three kernels x two boot paths x two initramfs kinds -----------------


def _write_jobs(folder: Path, created: str) -> list[Path]:
    paths = []
    for kernel in KERNELS:
        job = folder / f"bootharness-{kernel}"
        job.mkdir(parents=True)
        (job / "results.json").write_text(_night(created, kernel, f"ci-{kernel}").to_json())
        paths.append(job / "results.json")
    return paths


def _earlier_night(folder: Path) -> Path:
    """Last night, before boot paths and foreign images reached the ids or the records: the
    same kernels, the PVH boots of our own initramfs, ids without the path or template."""
    records = []
    for kernel in KERNELS:
        for ctl in ("ahci", "nvme"):
            outcome = "TEST_FAIL" if (kernel, ctl) == ("debian-6.12-amd64", "nvme") else "PASS"
            records.append(
                {
                    "nodeid": f"tests/boot/test_nightly.py::test_boot[{kernel}-{ctl}]",
                    "test": "test_boot",
                    "kernel": kernel,
                    "controller": ctl,
                    "template": "init.sh",
                    "outcome": outcome,
                }
            )
    data = {"format": "bootharness-results-1", "created": "2026-11-28T02:00:00+00:00"}
    folder.mkdir(parents=True)
    path = folder / "night-28.json"
    path.write_text(json.dumps({**data, "host": "ci", "tests": records}))
    return path


def test_merged_nightly_page_shows_every_dimension_and_history_across_new_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = _write_jobs(tmp_path / "nightly", "2026-11-29T02:00:00+00:00")
    earlier = _earlier_night(tmp_path / "history")
    out = tmp_path / "nightly" / "index.html"
    code = main(
        ["report", "merge", *map(str, inputs), "-o", str(out), "--history", str(earlier.parent)]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    page_text = out.read_text()
    page = _parse(page_text)

    # Every dimension the run varied, with every value, in the overview.
    assert page.overview["kernel"] == list(KERNELS)
    assert page.overview["boot_path"] == list(PATHS)
    assert page.overview["initramfs"] == ["ours init.sh", "foreign dracut"]
    assert page.overview["controller"] == ["ahci", "nvme"]
    assert "src-6.1-min: commit 3f2a9c1d7e4b, config a1b2c3d4e5f6" in page_text
    assert "foreign dracut image 9c8b7a6d5e4f" in page_text
    # Rows by kernel, columns by controller (ties go to the controller), 8 entries a row.
    assert [c["data-kernel"] for c in page.cells] == [k for k in KERNELS for _ in range(2)]
    assert len(page.entries) == 3 * 2 * 2 * 2
    for entry in page.entries:
        assert (
            entry["data-boot-path"] in PATHS
            and entry["data-initramfs"] in page.overview["initramfs"]
        )
    # The failure section names the boot's every dimension, its trace; warnings listed.
    assert "boot path bios-grub · initramfs foreign dracut (image 9c8b7a6d5e4f)" in page_text
    assert '<pre class="trace">mount_root+0x12/0x40 init/do_mounts.c:432</pre>' in page_text
    assert page_text.count(f'<pre class="warnings">{WARNING}</pre>') == 1
    # One chart bar per kernel and boot path (4 phases each for passing boots).
    assert {(b["data-kernel"], b["data-boot-path"]) for b in page.bars} == {
        (k, p) for k in KERNELS for p in PATHS
    }

    # History: last night's ids had no path or template, its records no boot path; tonight's
    # PVH boots of our initramfs are still the same tests.
    runs = history.load_runs([earlier.parent])
    tonight = Results.load(inputs[1])
    streaks = history.compare(tonight, runs)
    fixed = "tests/boot/test_nightly.py::test_boot[debian-6.12-amd64-nvme-pvh-init.sh]"
    assert streaks[fixed].status == history.FIXED
    same = "tests/boot/test_nightly.py::test_boot[debian-6.12-amd64-ahci-pvh-init.sh]"
    assert streaks[same].status == history.PASSING
    new_kind = "tests/boot/test_nightly.py::test_boot[debian-6.12-amd64-ahci-pvh-dracut]"
    assert streaks[new_kind].status == history.UNKNOWN  # never ran before: no history
    assert "1 fixed tonight" in page_text

    # The terminal: one row per kernel with its dimensions and failures.
    rows = {
        line.split()[0]: line for line in printed.splitlines() if line.startswith(("debian", "src"))
    }
    assert set(rows) == set(KERNELS)
    assert "1 KERNEL_FAULT" not in rows["src-6.1-min"]
    assert "2 KERNEL_FAULT" in rows["src-6.1-min"] and "pvh, bios-grub" in rows["src-6.1-min"]
    assert "ours init.sh, foreign dracut" in rows["debian-6.1-amd64"]


def test_history_key_survives_a_new_dimension_in_the_id_and_refuses_to_guess() -> None:
    old = TestRecord("t.py::test_root[k-ahci]", "test_root", kernel="k", controller="ahci")
    new = replace(old, nodeid="t.py::test_root[k-ahci-bios-grub]", boot_path="bios-grub")
    pvh = replace(old, nodeid="t.py::test_root[k-ahci-pvh]")
    assert pvh.history_key() == old.history_key()
    assert new.history_key() != old.history_key()  # another boot path: another test
    label = replace(old, nodeid="t.py::test_root[k-ahci-label]", params="k-ahci-label")
    assert label.history_key() != old.history_key()
    # Two earlier records with one key: neither is taken for tonight's.
    twins = Results(
        [
            replace(old, outcome="TEST_FAIL"),
            replace(old, nodeid="t.py::test_root[k-ahci-x]", params="k-ahci"),
        ],
        "2026-01-01T00:00:00+00:00",
    )
    tonight = Results([pvh], "2026-01-02T00:00:00+00:00")
    assert history.compare(tonight, [history.Run(twins)])[pvh.nodeid].status == history.UNKNOWN


# -- the terminal -----------------------------------------------------------------------------


def test_bisect_table_lists_every_candidate_and_marks_the_answer() -> None:
    def step(name: str, outcome: Outcome, cached: bool = False) -> Step:
        return Step(name, Observation(outcome, cached=cached), 2.5, "middle")

    result = BisectResult(
        Status.FOUND,
        ("a", "b", "c", "d"),
        [
            step("a", Outcome.PASS, True),
            step("d", Outcome.KERNEL_FAULT),
            step("c", Outcome.KERNEL_FAULT),
            step("b", Outcome.PASS),
        ],
        last_good="b",
        first_bad="c",
        suspects=("c",),
    )
    lines = text.bisect_table(result)
    assert lines[0].split() == ["CANDIDATE", "OUTCOME", "VERDICT", "TIME", "HOW"]
    assert lines[1].split() == ["a", "PASS", "good", "2.5", "s", "cached"]
    assert lines[2].endswith("<- last good") and lines[3].endswith("<- first bad")
    assert lines[4].split()[:3] == ["d", "KERNEL_FAULT", "bad"]


class _Stub:
    """Marks appearing over time, as a booting VM's do (the printer is under test here)."""

    def __init__(self) -> None:
        self.marks: list[Mark] = [Mark("qemu-started", 0.0)]

    def elapsed(self) -> float | None:
        return 1.0


def _screen(output: str) -> list[str]:
    """What a terminal shows after ``output``: ERASE clears the line being written."""
    lines = [""]
    for part in re.split(r"(\r\x1b\[K|\n)", output):
        if part == "\n":
            lines.append("")
        elif part == ERASE:
            lines[-1] = ""
        else:
            lines[-1] += part
    return lines


@pytest.mark.parametrize("live", [False, True])
def test_boot_progress_writes_each_mark_once_and_leaves_no_status_line(live: bool) -> None:
    vm, stream = _Stub(), io.StringIO()
    names = ["first-byte", "INIT-START", f"fault:warning  {WARNING}", "PASS", "shutdown"]
    with BootProgress(vm, stream, live=live, interval=0.01) as progress:
        for at, name in enumerate(names, 1):
            vm.marks.append(Mark(name, float(at)))
            deadline = 200
            while progress.written < len(vm.marks) and deadline:
                deadline -= 1
                time.sleep(0.005)  # the watcher polls every 10 ms here
        progress.finish(vm.marks)
    output = stream.getvalue()
    shown = [line for line in _screen(output) if line]
    assert [line.split(" s  ", 1)[1] for line in shown] == ["qemu-started", *names]
    assert (ERASE in output) is live and ("firmware…" in output or "init…" in output) is live
