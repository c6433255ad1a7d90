"""Real bisections: over git revisions of an init template, and over Debian kernel releases.

Every boot goes through a QEMU wrapper that records each real boot (and can fail one kernel
on purpose), so boot counts come from outside the harness.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.bisect.search import Observation, bisect
from harness.cache import cache_root
from harness.cli import main as cli
from harness.image import templates
from harness.kernel.catalogue import find_catalogue, load_catalogue
from harness.kernel.provision import Kernel, provision

FAST_KERNEL = "debian-6.1-cloud-amd64"

# Records every boot in $BH_QEMU_LOG; when an argument contains $BH_QEMU_FAIL (a kernel's
# package name), exits 1 at once like a QEMU that cannot start, and records that instead.
QEMU_WRAPPER = """#!/bin/sh
case " $* " in
*" -kernel "*)
\tif [ -n "$BH_QEMU_FAIL" ]; then
\t\tcase "$*" in *"$BH_QEMU_FAIL"*)
\t\t\techo "injected $BH_QEMU_FAIL" >>"$BH_QEMU_LOG"
\t\t\techo "qemu-system-x86_64: injected failure for $BH_QEMU_FAIL" >&2
\t\t\texit 1 ;;
\t\tesac
\tfi
\techo "boot $*" >>"$BH_QEMU_LOG" ;;
esac
exec {real} "$@"
"""


@dataclass
class Qemu:
    """The wrapper's log: real boots and injected failures, in order."""

    log: Path

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def boots(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("boot ")]

    def injected(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("injected ")]


@pytest.fixture
def qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Qemu]:
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    folder = tmp_path / "bin"
    folder.mkdir()
    wrapper = folder / "qemu-system-x86_64"
    wrapper.write_text(QEMU_WRAPPER.format(real=real))
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("BH_QEMU_LOG", str(tmp_path / "qemu.log"))
    monkeypatch.delenv("BH_QEMU_FAIL", raising=False)
    yield Qemu(tmp_path / "qemu.log")


# --- across git revisions -------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *argv: str) -> str:
    result = subprocess.run(
        ["git", *argv],
        cwd=repo,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"git {' '.join(argv)}: {result.stdout}{result.stderr}"
    return result.stdout


def commit(repo: Path, message: str) -> str:
    git(repo, "commit", "-q", "-am", message)
    return git(repo, "rev-parse", "HEAD").strip()


def edit(path: Path, after: str, line: str) -> None:
    text = path.read_text()
    assert after in text, f"{after!r} not in the template"
    path.write_text(text.replace(after, after + line + "\n", 1))


def test_git_bisect_run_names_the_commit_that_broke_the_init(
    tmp_path: Path, qemu: Qemu, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    template = repo / templates.DEFAULT_TEMPLATE
    shutil.copy(templates.BUILTIN_TEMPLATES / templates.DEFAULT_TEMPLATE, template)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "import the init template")
    good = git(repo, "rev-parse", "HEAD").strip()
    # Harmless revisions around one that breaks the boot: a mount that can only fail.
    revisions = [
        ("mount -t tmpfs tmpfs /tmp\n", "echo bootharness: tmp mounted", "log the tmp mount"),
        ("mark DEVICES-READY\n", "ls /dev >/dev/null", "list /dev"),
        ('mark INIT-START "pid $$"\n', "echo bootharness: init is $$", "log the pid"),
        (
            "mount -t tmpfs tmpfs /tmp\n",
            'mkdir -p /mnt && mount -t nosuchfs none /mnt || fail "cannot mount /mnt"',
            "mount a scratch file system",
        ),
        ("mark PARTITIONS-LISTED\n", "echo bootharness: partitions listed", "log partitions"),
        ("mark DEVICES-READY\n", "uname -r", "print the release"),
        ("mark MODULES-LOADED {{ modules | length }}\n", "true", "a no-op"),
    ]
    shas = []
    for after, line, message in revisions:
        edit(template, after, line)
        shas.append(commit(repo, message))
    breaking = shas[3]

    step = [
        sys.executable,
        "-m",
        "harness.cli.main",
        "bisect-step",
        "--kernels",
        str(find_catalogue(None)),
        "--verdicts",
        str(tmp_path / "verdicts"),
        "--",
        "boot",
        "-k",
        FAST_KERNEL,
        "--template-dir",
        ".",
        "--accel",
        "tcg",
    ]
    git(repo, "bisect", "start", shas[-1], good)
    run = subprocess.run(
        ["git", "bisect", "run", *step],
        cwd=repo,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    output = run.stdout + run.stderr
    git(repo, "bisect", "reset")
    assert run.returncode == 0, output
    found = re.search(r"^([0-9a-f]{40}) is the first bad commit", output, re.MULTILINE)
    assert found is not None, output
    assert found.group(1) == breaking, output
    assert "cannot mount /mnt" in output  # the bad step said why
    # git asks about the 6 revisions strictly between the ends: at most ceil(log2(7)) boots.
    assert 1 <= len(qemu.boots()) <= math.ceil(math.log2(len(shas))), qemu.lines()


# --- across Debian kernel releases ----------------------------------------------------


def bisect_kernels() -> list[Kernel]:
    catalogue = load_catalogue(find_catalogue(None))
    kernels = [provision(e, cache_root(), progress=False) for e in catalogue.select(["tag:bisect"])]
    assert len(kernels) >= 4, "kernels.toml must tag at least four kernels 'bisect'"
    return kernels


def debian_version(text: str) -> tuple[int, ...]:
    """'6.1.187-1' -> (6, 1, 187, 1)."""
    return tuple(int(part) for part in re.split(r"[.-]", text))


def version_check(threshold: str) -> str:
    """A guest command that fails on kernels whose Debian version is >= ``threshold``."""
    wanted = " ".join(str(n) for n in debian_version(threshold))
    return (
        "v=$(uname -v | sed -n 's/.* Debian \\([0-9.]*\\)-\\([0-9]*\\) .*/\\1.\\2/p'); "
        'echo "bootharness: debian version $v"; '
        f'echo "$v" | awk -v want="{wanted}" '
        '\'{n = split($0, a, "."); split(want, b, " "); '
        "for (i = 1; i <= 4; i++) "
        "{ if (a[i] + 0 < b[i] + 0) exit 0; if (a[i] + 0 > b[i] + 0) exit 1 } "
        "exit 1 }'"
    )


def expected_first_bad(kernels: list[Kernel], threshold: str) -> str:
    limit = debian_version(threshold)
    return next(k.name for k in kernels if debian_version(k.version) >= limit)


def run_bisect(
    kernels: list[Kernel], threshold: str, verdicts: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    code = cli.main(
        [
            "bisect",
            "--good",
            kernels[0].name,
            "--bad",
            kernels[-1].name,
            "--accel",
            "tcg",
            "--verdicts",
            str(verdicts),
            "--workdir",
            str(verdicts.parent / f"runs-{len(list(verdicts.parent.glob('runs-*')))}"),
            "--run",
            version_check(threshold),
            # A private copy of the template: the verdicts are keyed on its content, and
            # the shared one may be edited while the test runs.
            "--template-dir",
            str(template_snapshot(verdicts.parent)),
        ]
    )
    output = capsys.readouterr().out
    print(output, file=sys.stderr)  # shown with a failure report; not read back as output
    return code, output


def template_snapshot(folder: Path) -> Path:
    snapshot = folder / "templates"
    if not snapshot.exists():
        snapshot.mkdir()
        shutil.copy(templates.BUILTIN_TEMPLATES / templates.DEFAULT_TEMPLATE, snapshot)
    return snapshot


def step_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("step: ")]


def test_bisect_over_debian_releases_finds_the_release_within_the_bound(
    tmp_path: Path, qemu: Qemu, capsys: pytest.CaptureFixture[str]
) -> None:
    kernels = bisect_kernels()
    threshold = kernels[len(kernels) // 2 - 1].version  # a release in the middle turns bad
    first_bad = expected_first_bad(kernels, threshold)
    index = [k.name for k in kernels].index(first_bad)
    verdicts = tmp_path / "verdicts"

    code, output = run_bisect(kernels, threshold, verdicts, capsys)

    assert code == 0, output
    assert f"first bad:   {first_bad}" in output
    assert f"last good:   {kernels[index - 1].name}" in output
    # The summary table: every candidate once, in order, the answer marked.
    names = [k.name for k in kernels]
    rows = {
        words[0]: line
        for line in output.splitlines()
        if (words := line.split())[:1] and words[0] in names
    }
    assert list(rows) == names, output
    assert rows[first_bad].endswith("<- first bad")
    assert rows[names[index - 1]].endswith("<- last good")
    log_line = re.search(r"^failing log: (.+)$", output, re.MULTILINE)
    assert log_line is not None, output
    console = Path(log_line.group(1)).read_text()
    assert f"debian version {kernels[index].version.replace('-', '.')}" in console
    assert "FAIL command 1 exited 1" in console
    boots = qemu.boots()
    assert len(boots) == len(step_lines(output)), output
    assert len(boots) <= 2 + math.ceil(math.log2(len(kernels))), output
    for line in step_lines(output):
        assert re.match(r"step: \S+: (PASS|TEST_FAIL) -> (good|bad) \(\d+\.\d s, booted", line)

    # The same bisection again: every verdict from the cache, no QEMU started at all.
    before = len(qemu.lines())
    again, output_again = run_bisect(kernels, threshold, verdicts, capsys)
    assert again == 0, output_again
    assert f"first bad:   {first_bad}" in output_again
    assert len(qemu.lines()) == before, "the second run started QEMU"
    assert all("cached" in line for line in step_lines(output_again))
    assert f"({len(boots)} from the cache)" in output_again
    assert len(step_lines(output_again)) == len(step_lines(output))


def test_infra_error_at_a_step_is_skipped_never_bad_and_a_rerun_boots_nothing(
    tmp_path: Path, qemu: Qemu, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernels = bisect_kernels()
    names = [k.name for k in kernels]
    threshold = kernels[-2].version  # late, so the first middle probe is good or skipped
    first_bad = expected_first_bad(kernels, threshold)
    # The kernel the bisection probes first in the middle (the pure algorithm, no boots).
    probed: list[str] = []

    def record(name: str) -> Observation:
        probed.append(name)
        from harness.outcome import Outcome

        bad = names.index(name) >= names.index(first_bad)
        return Observation(Outcome.TEST_FAIL if bad else Outcome.PASS)

    bisect(names, record)
    victim = kernels[names.index(probed[2])]
    assert victim.name != first_bad
    package = victim.vmlinuz.parents[2].name  # .../<package>/root/boot/vmlinuz-*
    monkeypatch.setenv("BH_QEMU_FAIL", package)
    verdicts = tmp_path / "verdicts"

    code, output = run_bisect(kernels, threshold, verdicts, capsys)

    assert code == 0, output
    assert f"first bad:   {first_bad}" in output
    assert f"skipped:     {victim.name}" in output
    assert len(qemu.injected()) == 1, qemu.lines()
    victim_lines = [line for line in step_lines(output) if f": {victim.name}:" in line]
    assert len(victim_lines) == 1 and "INFRA_ERROR -> skip" in victim_lines[0], output
    assert "injected failure" in victim_lines[0], "the skip must carry QEMU's reason"
    assert package not in " ".join(qemu.boots()), "the victim booted despite the injected fault"
    real_boots = len(qemu.boots())
    assert real_boots == len(step_lines(output)) - 1

    # Again: the guest verdicts come from the cache; the unbootable kernel is tried again
    # (an INFRA_ERROR is never cached), fails again, and nothing boots.
    again, output_again = run_bisect(kernels, threshold, verdicts, capsys)
    assert again == 0, output_again
    assert f"first bad:   {first_bad}" in output_again
    assert len(qemu.boots()) == real_boots, f"the second run booted:\n{output}\n{output_again}"
    assert len(qemu.injected()) == 2
    assert sum("cached" in line for line in step_lines(output_again)) == real_boots
    assert f"({real_boots} from the cache)" in output_again


# --- the pytest oracle (no boot: the test only reads the provisioned kernel) ------------

PYTEST_ORACLE_TEST = """
from harness.outcome import InfraError

def test_version(kernel):
    if kernel.name == {infra!r}:
        raise InfraError("no QEMU for this kernel today")
    assert tuple(int(p) for p in kernel.version.replace("-", ".").split(".")) < {limit!r}
"""


def test_pytest_oracle_maps_exit_codes_and_junit_outcomes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernels = bisect_kernels()[:4]
    threshold = kernels[3].version  # the skipped kernel is not next to the first bad one
    infra = kernels[1].name
    (tmp_path / "test_oracle.py").write_text(
        PYTEST_ORACLE_TEST.format(infra=infra, limit=debian_version(threshold))
    )
    catalogue = find_catalogue(None)
    monkeypatch.chdir(tmp_path)
    argv = [
        "--kernels",
        str(catalogue),
        "bisect",
        "--kernels-list",
        ",".join(k.name for k in kernels),
        "--pytest",
        "test_oracle.py::test_version",
        "--verdicts",
        str(tmp_path / "verdicts"),
        "--workdir",
        str(tmp_path / "runs"),
    ]
    code = cli.main(argv)
    output = capsys.readouterr().out
    assert code == 0, output
    assert f"first bad:   {expected_first_bad(kernels, threshold)}" in output
    assert f"{infra}: INFRA_ERROR -> skip" in output
    assert "TEST_FAIL -> bad" in output and "PASS -> good" in output
