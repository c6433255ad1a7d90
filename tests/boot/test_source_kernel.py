"""Kernels built from source, for real: Debian's linux-source-6.1 with the shipped minimal
fragment builds once into the cache, boots, drives the suite's own boot, storage and guest
tests, provokes warnings and oopses on demand (LKDTM), and is never built twice.

The first run on a machine builds the minimal kernel (a few minutes on 2 cores); later runs
find it in the cache. The debug-info kernel and the real git bisection build more and are
``nightly``. Set ``BOOTHARNESS_BUILD_LOCK`` to share one lock with other kernel builds on a
shared machine.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.cache import cache_root
from harness.image.initramfs import InitramfsSpec
from harness.kernel import source
from harness.kernel.catalogue import Catalogue, load_catalogue
from harness.kernel.provision import Kernel, provision, source_plan
from harness.outcome import ConfigError, KernelFault
from harness.vm.boot import BootRequest, BootResult, Vm, prepare_vm, run
from harness.vm.kernel_warnings import WarningPolicy

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "minimal-6.1"
DEBUG = "minimal-6.1-debug"
PROVOKE = "/sys/kernel/debug/provoke-crash/DIRECT"
DEBUGFS = "mount -t debugfs debugfs /sys/kernel/debug"

CATALOGUE = f"""\
default = "{MINIMAL}"

[kernels."{MINIMAL}"]
linux_source = "linux-source-6.1"
tags = ["source", "nightly"]
note = "Debian's linux-source-6.1 with the harness's minimal fragment"

[kernels."{DEBUG}"]
linux_source = "linux-source-6.1"
debug_info = true
tags = ["source-debug"]
note = "the same with debug info: traces resolve to file:line"
"""


@pytest.fixture(scope="module")
def catalogue_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("source-catalogue") / "kernels.toml"
    path.write_text(CATALOGUE)
    return path


@pytest.fixture(scope="module")
def catalogue(catalogue_file: Path) -> Catalogue:
    return load_catalogue(catalogue_file)


@pytest.fixture(scope="module")
def minimal(catalogue: Catalogue) -> Kernel:
    """The minimal kernel, built on first use (cold: minutes), from the cache afterwards."""
    return provision(catalogue.get(MINIMAL), cache_root(), progress=False)


def boot_commands(
    kernel: Kernel, tmp_path: Path, commands: list[str], policy: WarningPolicy | None = None
) -> tuple[BootResult, Vm]:
    """Boot the default template running ``commands`` (lkdtm loaded); (result, vm)."""
    request = BootRequest(
        kernel,
        InitramfsSpec(variables={"commands": commands}, modules=("lkdtm",)),
        kernel_warnings=policy or WarningPolicy(),
    )
    vm = prepare_vm(request, cache_root=cache_root(), workdir=tmp_path / "vm")
    return run(vm, kernel=kernel, accel="tcg"), vm


@pytest.mark.boot
def test_minimal_kernel_builds_has_every_option_and_boots_to_pass(
    minimal: Kernel, tmp_path: Path
) -> None:
    assert minimal.release.startswith("6.1.")
    assert minimal.config_digest and minimal.version.startswith("build-")
    assert minimal.modules_dir is not None and (minimal.modules_dir / "modules.dep").is_file()
    assert minimal.debug_vmlinux is not None and minimal.system_map is not None
    for option, value in {
        "CONFIG_PVH": "y",
        "CONFIG_BLK_DEV_RAM": "y",
        "CONFIG_ROOT_NFS": "y",
        "CONFIG_IP_PNP": "y",
        "CONFIG_EFI_STUB": "y",
        "CONFIG_SATA_AHCI": "m",
        "CONFIG_BLK_DEV_NVME": "m",
        "CONFIG_LKDTM": "m",
    }.items():
        assert minimal.config.get(option) == value, option
    assert minimal.vmlinux() is not None, "the minimal kernel boots through its PVH entry"
    result, _ = boot_commands(minimal, tmp_path, ["uname -r"])
    assert result.outcome.name == "PASS", result.render()


@pytest.mark.boot
def test_the_same_inputs_never_build_twice(minimal: Kernel, catalogue: Catalogue) -> None:
    plan = source_plan(catalogue.get(MINIMAL), cache_root(), progress=False)
    built = source.cached(plan)
    assert built is not None and built.folder == minimal.cache_dir
    log_before = built.log_path.stat().st_mtime_ns
    again = provision(catalogue.get(MINIMAL), cache_root(), progress=False)
    assert again == minimal
    assert built.log_path.stat().st_mtime_ns == log_before  # no make ran


@pytest.mark.boot
def test_an_option_the_tree_cannot_set_is_a_config_error_naming_it(
    catalogue_file: Path, tmp_path: Path
) -> None:
    fragment = tmp_path / "impossible.config"
    # SATA_AHCI=y cannot be built in while ATA (its parent) is a module; the other option
    # does not exist at all.
    fragment.write_text("CONFIG_SATA_AHCI=y\nCONFIG_BOOTHARNESS_NO_SUCH_OPTION=y\n")
    path = tmp_path / "kernels.toml"
    path.write_text(
        textwrap.dedent(f"""\
            [kernels."impossible"]
            linux_source = "linux-source-6.1"
            fragments = ["{fragment}"]
            """)
    )
    with pytest.raises(ConfigError) as caught:
        provision(load_catalogue(path).get("impossible"), cache_root(), progress=False)
    message = str(caught.value)
    assert "CONFIG_SATA_AHCI=y (from " in message and "ended up m" in message, message
    assert "CONFIG_BOOTHARNESS_NO_SUCH_OPTION=y" in message and "ended up n" in message, message


def suite_run(catalogue_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-n",
            "0",
            "--kernels",
            str(catalogue_file),
            "--kernel",
            MINIMAL,
            "--accel",
            "tcg",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )


@pytest.mark.boot
def test_suite_slice_passes_on_the_minimal_kernel(minimal: Kernel, catalogue_file: Path) -> None:
    """A slice of the suite's own boot, storage-controller and guest-shell tests, on the
    minimal kernel (the whole of them: the nightly test below)."""
    done = suite_run(
        catalogue_file,
        "tests/boot/test_boot.py::test_boot_reaches_success_marker",
        "tests/boot/test_storage.py::test_switch_root_on_every_controller",
        "tests/boot/test_guest.py::test_shell_returns_exact_output_and_status_even_after_early_input",
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


@pytest.mark.nightly
@pytest.mark.boot
def test_boot_storage_and_guest_tests_pass_on_the_minimal_kernel(
    minimal: Kernel, catalogue_file: Path
) -> None:
    done = suite_run(
        catalogue_file,
        "tests/boot/test_boot.py",
        "tests/boot/test_storage.py",
        "tests/boot/test_guest.py",
        "--controller",
        "all",
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    # pytest exits 0 when every test skips: a kernel lacking what the tests need must not
    # pass this way (on the minimal kernel every one of them runs).
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


# --- warnings: LKDTM's WARNING under each policy, through pytest --------------------------

WARN_TEST = f"""
def test_warns(boot):
    vm = boot(modules=["lkdtm"], variables={{"commands": [
        "{DEBUGFS}", "echo WARNING > {PROVOKE}", "echo after the warning"]}})
    vm.expect_pass()
"""


def run_warning_test(
    pytester: pytest.Pytester, catalogue_file: Path, *options: str
) -> tuple[pytest.RunResult, str]:
    pytester.makepyfile(test_lkdtm=WARN_TEST)
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--kernels",
        str(catalogue_file),
        "--kernel",
        MINIMAL,
        "--accel",
        "tcg",
        f"--junitxml={junit}",
        "-rA",
        *options,
        timeout=600,
    )
    return result, junit.read_text() if junit.exists() else ""


@pytest.mark.boot
def test_a_warning_under_report_passes_and_is_listed(
    minimal: Kernel, pytester: pytest.Pytester, catalogue_file: Path
) -> None:
    result, junit = run_warning_test(pytester, catalogue_file)
    result.assert_outcomes(passed=1)
    text = result.stdout.str()
    assert "bootharness kernel warnings" in text, text  # the terminal summary
    assert re.search(r"test_warns.*WARNING: CPU: 0 PID: \d+ at .*lkdtm", text), text
    assert 'name="kernel_warnings"' in junit and "lkdtm_WARNING" in junit, junit


@pytest.mark.boot
def test_a_warning_under_fail_fails_as_a_kernel_fault_with_its_trace(
    minimal: Kernel, pytester: pytest.Pytester, catalogue_file: Path
) -> None:
    result, junit = run_warning_test(pytester, catalogue_file, "--kernel-warnings", "fail")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "KERNEL_FAULT: kernel warning (kernel warnings policy: fail): warning" in text, text
    assert "symbolised trace:" in text and "lkdtm_WARNING" in text, text
    assert 'name="outcome" value="KERNEL_FAULT"' in junit, junit


@pytest.mark.boot
def test_an_allowlisted_warning_passes_under_fail(
    minimal: Kernel, pytester: pytest.Pytester, catalogue_file: Path
) -> None:
    allowlist = pytester.path / "known-warnings.toml"
    allowlist.write_text(
        '[[warning]]\nregex = "lkdtm_WARNING"\nreason = "LKDTM warns on purpose in this test"\n'
    )
    result, _ = run_warning_test(
        pytester,
        catalogue_file,
        "--kernel-warnings",
        "fail",
        "--kernel-warnings-allowlist",
        str(allowlist),
    )
    result.assert_outcomes(passed=1)
    assert "known (LKDTM warns on purpose in this test)" in result.stdout.str()


# --- where it crashed -------------------------------------------------------------------


@pytest.mark.boot
def test_an_oops_in_a_module_shows_its_frames_and_vmlinux_addresses(
    minimal: Kernel, tmp_path: Path
) -> None:
    result, _ = boot_commands(minimal, tmp_path, [DEBUGFS, f"echo EXCEPTION > {PROVOKE}"])
    error = result.error
    assert isinstance(error, KernelFault), result.render()
    trace = error.evidence.trace
    assert "lkdtm_EXCEPTION" in trace and "[lkdtm]" in trace, trace
    # Frames in vmlinux get their address from the build's own symbols.
    assert re.search(r"\w+\+0x[0-9a-f]+/0x[0-9a-f]+ \(0xffffffff8[0-9a-f]{7}\)", trace), trace
    assert "symbolised trace:" in str(error)


def system_map_addresses(path: Path) -> dict[str, set[int]]:
    addresses: dict[str, set[int]] = {}  # static functions may share a name
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            addresses.setdefault(parts[2], set()).add(int(parts[0], 16))
    return addresses


def sysrq_crash_trace(kernel: Kernel, tmp_path: Path) -> str:
    spec = InitramfsSpec(variables={"commands": ["echo c > /proc/sysrq-trigger"]})
    vm = prepare_vm(BootRequest(kernel, spec), cache_root=cache_root(), workdir=tmp_path / "vm")
    result = run(vm, kernel=kernel, accel="tcg")
    assert isinstance(result.error, KernelFault), result.render()
    assert "symbolised trace:" in str(result.error)
    return result.error.evidence.trace


def assert_frames_match_the_system_map(trace: str, system_map: Path) -> None:
    addresses = system_map_addresses(system_map)
    frames = re.findall(r"([\w.]+)\+0x([0-9a-f]+)/0x[0-9a-f]+ \(0x([0-9a-f]+)\)", trace)
    assert any(name == "sysrq_handle_crash" for name, _, _ in frames), trace
    for name, offset, address in frames:
        assert int(address, 16) - int(offset, 16) in addresses[name], (name, trace)


@pytest.mark.boot
def test_a_kernel_with_only_a_system_map_shows_symbol_offsets_and_addresses(
    minimal: Kernel, tmp_path: Path
) -> None:
    only_map = dataclasses.replace(minimal, debug_vmlinux=None)
    assert only_map.system_map is not None
    trace = sysrq_crash_trace(only_map, tmp_path)
    assert_frames_match_the_system_map(trace, only_map.system_map)


@pytest.mark.nightly
@pytest.mark.boot
def test_a_debian_kernel_oops_is_symbolised_with_its_debug_package(tmp_path: Path) -> None:
    """Debian's own System.map is a placeholder: the real one, and a vmlinux with debug info,
    come from the -dbg package (debug_symbols = true; the cloud kernel's is ~280 MB)."""
    path = tmp_path / "kernels.toml"
    path.write_text(
        '[kernels."cloud-dbg"]\n'
        'debian_package = "linux-image-6.1.0-56-cloud-amd64-unsigned"\n'
        "debug_symbols = true\n"
    )
    kernel = provision(load_catalogue(path).get("cloud-dbg"), cache_root(), progress=False)
    assert kernel.system_map is not None and kernel.debug_vmlinux is not None
    trace = sysrq_crash_trace(kernel, tmp_path)
    assert_frames_match_the_system_map(trace, kernel.system_map)
    crash = next(line for line in trace.splitlines() if "sysrq_handle_crash" in line)
    assert re.search(r"drivers/tty/sysrq\.c:\d+", crash), trace


@pytest.mark.nightly
@pytest.mark.boot
def test_debug_info_kernel_oops_shows_file_and_line(catalogue: Catalogue, tmp_path: Path) -> None:
    kernel = provision(catalogue.get(DEBUG), cache_root(), progress=False)
    assert kernel.config.get("CONFIG_DEBUG_INFO") == "y"
    result, vm = boot_commands(kernel, tmp_path, [DEBUGFS, f"echo EXCEPTION > {PROVOKE}"])
    error = result.error
    assert isinstance(error, KernelFault), result.render()
    trace = error.evidence.trace
    faulting = next(line for line in trace.splitlines() if "lkdtm_EXCEPTION" in line)
    assert re.search(r"drivers/misc/lkdtm/bugs\.c:\d+", faulting), trace
    bundle_trace = vm.fault_traces()
    assert "drivers/misc/lkdtm/bugs.c:" in bundle_trace


# --- bisecting real commits ---------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *argv: str) -> str:
    done = subprocess.run(
        ["git", *argv], cwd=repo, env={**os.environ, **GIT_ENV}, capture_output=True, text=True
    )
    assert done.returncode == 0, f"git {' '.join(argv)}: {done.stdout}{done.stderr}"
    return done.stdout


KERNEL_INIT = "static int __ref kernel_init(void *unused)\n{"
TWO = '"bisect: two\\n");'


def change(repo: Path, path: str, old: str, new: str, message: str) -> str:
    file = repo / path
    text = file.read_text()
    assert old in text, (path, old)
    file.write_text(text.replace(old, new, 1))
    git(repo, "commit", "-qam", message)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.mark.nightly
@pytest.mark.boot
def test_git_bisect_run_names_the_commit_that_broke_the_boot(
    minimal: Kernel, tmp_path: Path
) -> None:
    tree, _ = source.unpack_package("linux-source-6.1", cache_root(), progress=False)
    repo = tmp_path / "linux"
    subprocess.run(["cp", "-a", str(tree), str(repo)], check=True)
    git(repo, "init", "-q")
    # --force: Debian's packaging appends "/*" (ignore everything at the top) to the tree's
    # .gitignore, so a plain `git add -A` adds nothing.
    git(repo, "add", "-A", "--force")
    git(repo, "commit", "-qm", "linux-source-6.1")
    good = git(repo, "rev-parse", "HEAD").strip()
    banner = 'pr_notice("Kernel command line: %s\\n", saved_command_line);'
    shas = [
        change(repo, "init/main.c", banner, banner + '\n\tpr_notice("bisect: two\\n");', "two"),
        change(
            repo,
            "init/main.c",
            "static int __ref kernel_init(void *unused)\n{",
            'static int __ref kernel_init(void *unused)\n{\n\tpanic("bisect: broken on purpose");',
            "three: panic in kernel_init",
        ),
        change(repo, "init/main.c", TWO, TWO.replace(");", ") does not compile;"), "four"),
        change(repo, "init/main.c", TWO.replace(");", ") does not compile;"), TWO, "five"),
    ]
    third = shas[1]
    catalogue_file = tmp_path / "kernels.toml"
    catalogue_file.write_text(f'[kernels."tree"]\ntree = "{repo}"\n')
    step = [
        sys.executable,
        "-m",
        "harness.cli.main",
        "bisect-step",
        "-k",
        "tree",
        "--kernels",
        str(catalogue_file),
        "--verdicts",
        str(tmp_path / "verdicts"),
        "--",
        "boot",
        "--accel",
        "tcg",
    ]

    def bisect_run() -> str:
        git(repo, "bisect", "start", shas[-1], good)
        done = subprocess.run(
            ["git", "bisect", "run", *step],
            cwd=repo,
            env={**os.environ, **GIT_ENV},
            capture_output=True,
            text=True,
            timeout=7200,
        )
        git(repo, "bisect", "reset")
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    output = bisect_run()
    found = re.search(r"^([0-9a-f]{40}) is the first bad commit", output, re.MULTILINE)
    assert found is not None and found.group(1) == third, output
    assert "bisect: broken on purpose" in output

    # The commit that does not compile is a skip with the compiler's first error.
    git(repo, "checkout", "-q", shas[2])
    done = subprocess.run(step, cwd=repo, capture_output=True, text=True, timeout=3600)
    git(repo, "checkout", "-q", "-")
    assert done.returncode == 125, done.stdout + done.stderr
    assert re.search(r"does not build: \S*init/main\.c:\d+:\d+: error: ", done.stdout), done.stdout

    # A second bisection builds nothing and boots nothing.
    before = build_logs_of(repo)
    assert before, "the builds of this tree left no logs"
    again = bisect_run()
    assert "is the first bad commit" in again
    assert "cached" in again and "booted" not in again, again
    assert build_logs_of(repo) == before, "a second bisection ran make"


def build_logs_of(tree: Path) -> dict[str, int]:
    """The build logs (name: mtime) of builds of ``tree``: make writes one per build, and
    rewrites it when it builds the same inputs again. Only this tree's: the logs folder is
    shared with every other build on the machine, which may run meanwhile."""
    logs = source.source_root(cache_root()) / "logs"
    header = f"# bootharness build of tree: {tree.resolve()} at "  # the catalogue resolves it
    found = {}
    for path in logs.glob("*.log"):
        with path.open(errors="replace") as file:
            if file.readline().startswith(header):
                found[path.name] = path.stat().st_mtime_ns
    return found
