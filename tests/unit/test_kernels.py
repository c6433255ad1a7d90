"""Provisioning rules that need no download: config parsing, local kernels, bad packages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.kernel import provision as kernels
from harness.kernel.catalogue import DebianPackage, KernelEntry, LocalFiles
from harness.outcome import ConfigError
from tests.fakes import fake_bzimage


def test_parse_config_keeps_values_and_drops_unset_options() -> None:
    text = 'CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D="ttyS0"\nCONFIG_E=100\n'
    assert kernels.parse_config(text) == {
        "CONFIG_A": "y",
        "CONFIG_B": "m",
        "CONFIG_D": "ttyS0",
        "CONFIG_E": "100",
    }


def test_local_kernel_release_comes_from_the_bzimage_header(tmp_path: Path) -> None:
    image = fake_bzimage(tmp_path / "bzImage", "6.9.0-mine")
    config = tmp_path / ".config"
    config.write_text("CONFIG_SATA_AHCI=m\n# CONFIG_NVME is not set\n")
    entry = KernelEntry("mine", LocalFiles(vmlinuz=image, config=config))
    kernel = kernels.provision(entry, tmp_path / "cache")
    assert kernel.release == "6.9.0-mine"
    assert kernel.has_config("CONFIG_SATA_AHCI")
    assert not kernel.has_config("CONFIG_NVME")
    assert kernels.is_provisioned(entry, tmp_path / "cache")


def test_local_modules_without_modules_dep_are_indexed_in_a_copy(tmp_path: Path) -> None:
    if shutil.which("depmod") is None:
        pytest.skip("depmod (kmod) is not installed")
    image = fake_bzimage(tmp_path / "bzImage", "6.9.0-mine")
    modules = tmp_path / "mods"
    (modules / "kernel").mkdir(parents=True)
    entry = KernelEntry("mine", LocalFiles(vmlinuz=image, modules=modules))
    kernel = kernels.provision(entry, tmp_path / "cache")
    assert kernel.modules_dir is not None
    assert (kernel.modules_dir / "modules.dep").exists()
    assert not (modules / "modules.dep").exists(), "the user's build tree must not be written"


def test_missing_local_vmlinuz_is_a_config_error(tmp_path: Path) -> None:
    entry = KernelEntry("gone", LocalFiles(vmlinuz=tmp_path / "bzImage"))
    with pytest.raises(ConfigError, match=r"gone.*bzImage.*does not exist"):
        kernels.provision(entry, tmp_path / "cache")


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_unknown_debian_package_is_a_config_error_and_leaves_nothing(tmp_path: Path) -> None:
    entry = KernelEntry("nope", DebianPackage("linux-image-0.0.0-no-such-flavour-unsigned"))
    with pytest.raises(ConfigError, match="Unable to locate package"):
        kernels.provision(entry, tmp_path / "cache", progress=False)
    assert not kernels.is_provisioned(entry, tmp_path / "cache")
    leftovers = list((tmp_path / "cache" / "kernels" / "debian").glob("linux-image-0*"))
    assert [p for p in leftovers if not p.name.endswith(".lock")] == []
