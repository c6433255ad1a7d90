"""Errors that name their cause: a full, read-only or forbidden cache, a package apt does not
know, an archive that does not answer; each its own message and outcome, with the tool's line.

Real file systems (a tiny tmpfs, a read-only mount: root only) and real apt-get (the full and
unreachable cases download or try to).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import cachefs
from harness.image import initramfs
from harness.image.initramfs import InitramfsSpec
from harness.kernel.provision import Kernel
from harness.outcome import Outcome

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "linux-image-6.1.0-56-amd64-unsigned"  # the default kernel's package


def bootharness(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli.main", "--kernels", str(REPO / "kernels.toml"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


Mount = Callable[..., Path]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    """``mount(size, read_only=False)``: a tmpfs of ``size`` in this test's folder."""
    mounted: list[Path] = []

    def make(size: str, read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_cache_says_no_space_with_apts_line(mount: Mount) -> None:
    cache = mount("4M")
    done = bootharness("--cache", str(cache), "fetch")
    assert done.returncode == Outcome.INFRA_ERROR.cli_exit, done.stderr
    assert "no space left on the cache's file system while" in done.stderr
    assert "No space left on device" in done.stderr  # apt's own line
    assert "free of 4.0 MiB" in done.stderr
    assert "apt-cache policy" not in done.stderr and "Traceback" not in done.stderr


def test_a_cache_too_small_for_an_image_says_no_space(mount: Mount, kernel: Kernel) -> None:
    cache = mount("256k")
    with pytest.raises(cachefs.CacheFull, match=r"no space left.*initramfs") as caught:
        initramfs.build(kernel, InitramfsSpec(), cache)
    assert caught.value.outcome is Outcome.INFRA_ERROR
    assert [p.name for p in (cache / "initramfs").iterdir() if not p.name.endswith(".lock")] == []


def test_a_read_only_cache_is_a_configuration_error_naming_it(mount: Mount) -> None:
    cache = mount("1M", read_only=True)
    done = bootharness("--cache", str(cache), "fetch")
    assert done.returncode == Outcome.CONFIG_ERROR.cli_exit, done.stderr
    assert "the cache is on a read-only file system" in done.stderr
    assert str(cache) in done.stderr and "--cache" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop a capability")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_a_cache_we_may_not_write_says_permission_denied(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, 65534, 65534)  # nobody's; root without CAP_DAC_OVERRIDE may not write
    drop = "-dac_override,-dac_read_search"
    argv = [sys.executable, "-m", "harness.cli.main", "--kernels", str(REPO / "kernels.toml")]
    argv += ["--cache", str(cache), "fetch"]
    done = subprocess.run(
        ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == Outcome.CONFIG_ERROR.cli_exit, done.stderr
    assert f"permission denied writing {cache}" in done.stderr
    assert "owned by uid 65534 with mode 0755" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unknown_debian_package_names_the_kernels_toml_entry(tmp_path: Path) -> None:
    catalogue = tmp_path / "kernels.toml"
    catalogue.write_text(
        '[kernels."typo"]\ndebian_package = "linux-image-6.1.0-56-amd64-unsigend"\n'
    )
    argv = [sys.executable, "-m", "harness.cli.main", "--kernels", str(catalogue)]
    done = subprocess.run(
        [*argv, "--cache", str(tmp_path / "cache"), "fetch", "typo"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == Outcome.CONFIG_ERROR.cli_exit, done.stderr
    said = done.stderr
    assert f"kernel 'typo' in {catalogue}" in said
    assert (
        "debian_package = 'linux-image-6.1.0-56-amd64-unsigend' is not a package apt knows" in said
    )
    assert "apt-cache search --names-only '^linux-image-'" in said
    assert f"Close names apt knows: {PACKAGE}" in said  # from apt's own lists
    assert "E: Unable to locate package" in said  # apt's line, attached


def test_an_archive_that_does_not_answer_is_a_retryable_infrastructure_error(
    tmp_path: Path,
) -> None:
    config = tmp_path / "apt.conf"
    config.write_text(
        'Acquire::http::Proxy "http://127.0.0.1:9";\nAcquire::Retries "0";\n'
        'Acquire::http::Timeout "5";\n'
    )
    done = bootharness("--cache", str(tmp_path / "cache"), "fetch", env={"APT_CONFIG": str(config)})
    assert done.returncode == Outcome.INFRA_ERROR.cli_exit, done.stderr
    assert "the package archive did not answer" in done.stderr
    assert "Failed to fetch" in done.stderr or "Could not connect" in done.stderr
    assert "not a package apt knows" not in done.stderr
