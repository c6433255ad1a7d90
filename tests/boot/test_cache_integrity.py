"""A damaged cache never makes a wrong boot: a truncated vmlinux, initramfs, unpacked package
or .deb is found on use, rebuilt with a warning, and the boot passes.

The tests damage a private cache of their own (the default kernel provisioned into it once),
never the run's. A truncated snapshot file is in test_snapshot.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import cache
from harness.image import initramfs
from harness.image.initramfs import InitramfsSpec
from harness.kernel import debian
from harness.kernel.catalogue import DebianPackage, KernelEntry
from harness.kernel.provision import Kernel, provision
from harness.outcome import Outcome
from harness.vm import boot


@pytest.fixture(scope="module")
def entry(request: pytest.FixtureRequest) -> KernelEntry:
    from harness.plugin.hooks import catalogue

    chosen = catalogue(request.config)
    default = chosen.get(chosen.default)
    if not isinstance(default.source, DebianPackage):
        pytest.skip("the default kernel is not a Debian package")
    return default


@pytest.fixture(scope="module")
def root(entry: KernelEntry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private cache holding the default kernel (its .deb copied from the run's cache
    when it is there, else downloaded)."""
    assert isinstance(entry.source, DebianPackage)
    private = tmp_path_factory.mktemp("private-cache")
    shared = debian.deb_path(entry.source.package, cache.cache_root())
    if shared.exists() and cache.check(shared) == []:
        target = debian.deb_path(entry.source.package, private)
        target.parent.mkdir(parents=True)
        shutil.copy2(shared, target)
        shutil.copy2(shared.with_name(shared.name + ".manifest.json"), target.parent)
    provision(entry, private, progress=False)
    yield private
    shutil.rmtree(private, ignore_errors=True)


def boots(kernel: Kernel, root: Path, workdir: Path) -> Outcome:
    request = boot.BootRequest(kernel, InitramfsSpec(variables={"commands": ["true"]}))
    vm = boot.prepare_vm(request, cache_root=root, workdir=workdir)
    result = boot.run(vm, kernel=kernel, accel="tcg")
    assert result.outcome is Outcome.PASS, result.render()
    return result.outcome


def truncate(path: Path) -> int:
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size // 2)
    return size


def test_a_truncated_vmlinux_is_extracted_again_and_the_boot_passes(
    entry: KernelEntry, root: Path, tmp_path: Path
) -> None:
    kernel = provision(entry, root, progress=False)
    vmlinux = kernel.vmlinux()
    assert vmlinux is not None
    size = truncate(vmlinux)
    with pytest.warns(cache.CacheCorruptWarning, match="vmlinux-.*truncated"):
        boots(kernel, root, tmp_path)
    assert vmlinux.stat().st_size == size


def test_a_truncated_initramfs_is_built_again_and_the_boot_passes(
    entry: KernelEntry, root: Path, tmp_path: Path
) -> None:
    kernel = provision(entry, root, progress=False)
    spec = boot.with_harness_modules(kernel, InitramfsSpec(variables={"commands": ["true"]}))
    image = initramfs.build(kernel, spec, root)
    size = truncate(image.path)
    with pytest.warns(cache.CacheCorruptWarning, match=r"\.cpio.*truncated"):
        boots(kernel, root, tmp_path)
    assert image.path.stat().st_size == size


def test_a_damaged_package_tree_is_unpacked_again_from_the_kept_deb_offline(
    entry: KernelEntry, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = provision(entry, root, progress=False)
    modules = sorted(kernel.modules_dir.rglob("*.ko*")) if kernel.modules_dir else []
    assert modules
    truncate(modules[0])
    truncate(kernel.vmlinuz)
    # Any download now fails: the tree must come from the .deb kept in the cache.
    config = tmp_path / "apt.conf"
    config.write_text('Acquire::http::Proxy "http://127.0.0.1:9";\nAcquire::Retries "0";\n')
    monkeypatch.setenv("APT_CONFIG", str(config))
    with pytest.warns(cache.CacheCorruptWarning, match="truncated"):
        again = provision(entry, root, progress=False)
    assert again.cache_dir is not None and cache.check(again.cache_dir, full=True) == []
    monkeypatch.delenv("APT_CONFIG")
    boots(again, root, tmp_path)


def test_a_truncated_deb_is_downloaded_again(
    entry: KernelEntry, root: Path, tmp_path: Path
) -> None:
    assert isinstance(entry.source, DebianPackage)
    kernel = provision(entry, root, progress=False)
    deb = debian.deb_path(entry.source.package, root)
    truncate(deb)
    truncate(kernel.vmlinuz)  # the tree must be unpacked again, from a whole .deb
    with pytest.warns(cache.CacheCorruptWarning) as warned:
        again = provision(entry, root, progress=False)
    damaged = " ".join(str(w.message) for w in warned)
    assert deb.name in damaged and "vmlinuz" in damaged
    assert cache.check(deb, full=True) == []
    boots(again, root, tmp_path)
