"""--boot-path, the boot_path fixture and marker, ids, skips and junit, with pytester.

No VM boots here: the kernels are fake local bzImages (no EFI stub in them), so what is
checked is the plugin's logic; tests/boot/test_boot_paths.py boots every path for real.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.fakes import local_catalogue


@pytest.fixture
def catalogue(pytester: pytest.Pytester) -> str:
    toml = local_catalogue(pytester.path, {"a": []})
    return f"--kernels={toml}"


def test_ids_read_kernel_controller_boot_path(pytester: pytest.Pytester, catalogue: str) -> None:
    pytester.makepyfile(
        """
        def test_cell(kernel, controller, boot_path):
            assert boot_path.name in ("bios-grub", "uefi-grub")

        def test_path(kernel, boot_path):
            pass
        """
    )
    result = pytester.runpytest(
        catalogue, "--controller", "ahci,ide", "--boot-path", "bios-grub,uefi-grub", "-v"
    )
    result.stdout.fnmatch_lines_random(
        [
            "*test_cell?k-a-ahci-bios-grub? PASSED*",
            "*test_cell?k-a-ahci-uefi-grub? PASSED*",
            "*test_cell?k-a-ide-bios-grub? PASSED*",
            "*test_cell?k-a-ide-uefi-grub? PASSED*",
        ]
    )
    result.assert_outcomes(passed=6)
    result = pytester.runpytest(catalogue, "-v", "-k", "test_path")  # no option: pvh
    result.stdout.fnmatch_lines(["*test_path?k-a-pvh? PASSED*"])
    result.assert_outcomes(passed=1)
    result = pytester.runpytest(catalogue, "--boot-path", "all", "-k", "test_path and stub")
    result.assert_outcomes(passed=1)
    result = pytester.runpytest(catalogue, "--boot-path", "all", "-k", "test_path")
    result.assert_outcomes(passed=5)


def test_boot_paths_marker_filters_and_widens(pytester: pytest.Pytester, catalogue: str) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.boot_paths("uefi-grub", "uefi-stub")
        def test_only_uefi(kernel, boot_path):
            assert boot_path.firmware == "ovmf"

        @pytest.mark.boot_paths("all", widen=True)
        def test_widened(kernel, boot_path):
            pass
        """
    )
    result = pytester.runpytest(catalogue, "-v")
    # No --boot-path: the default (pvh) is not a UEFI path; widen runs all five.
    result.stdout.fnmatch_lines_random(
        ["*test_only_uefi?k-a-no-boot_path? SKIPPED*", "*test_widened?k-a-uefi-stub? PASSED*"]
    )
    result.assert_outcomes(passed=5, skipped=1)
    result = pytester.runpytest(catalogue, "--boot-path", "uefi-stub,bios-grub", "-v")
    result.stdout.fnmatch_lines_random(
        ["*test_only_uefi?k-a-uefi-stub? PASSED*", "*test_widened?k-a-bios-grub? PASSED*"]
    )
    result.assert_outcomes(passed=3)


def test_unknown_boot_path_is_a_usage_error(pytester: pytest.Pytester, catalogue: str) -> None:
    pytester.makepyfile("def test_x(kernel, boot_path): pass")
    result = pytester.runpytest(catalogue, "--boot-path", "lilo")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown boot path(s) 'lilo'*pvh, bzimage, bios-grub*"])


def test_uefi_stub_skips_a_kernel_without_the_efi_stub(
    pytester: pytest.Pytester, catalogue: str
) -> None:
    """The fake bzImage has no PE header (as a kernel built without CONFIG_EFI_STUB); a kernel
    whose config says so is skipped by its config. Both say why; nothing is built or booted."""
    (pytester.path / "config").write_text("CONFIG_EFI=y\n# CONFIG_EFI_STUB is not set\n")
    toml = pytester.path / "kernels.toml"
    toml.write_text(
        toml.read_text() + '[kernels."k-configured"]\nvmlinuz = "bz-a"\nconfig = "config"\n'
    )
    pytester.makepyfile(
        """
        def test_boot(boot, boot_path):
            boot()
        """
    )
    result = pytester.runpytest(
        catalogue,
        "--kernel",
        "k-a",
        "--kernel",
        "k-configured",
        "--boot-path",
        "uefi-stub",
        "-rs",
        "--accel",
        "tcg",
    )
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines_random(
        [
            "*k-a (6.1.0-a): its bzImage has no EFI stub (no PE header; built without "
            "CONFIG_EFI_STUB), needed by boot path uefi-stub*",
            "*k-configured (6.1.0-a) lacks CONFIG_EFI_STUB, needed by boot path uefi-stub*",
        ]
    )


def test_junit_records_the_boot_path(pytester: pytest.Pytester, catalogue: str) -> None:
    pytester.makepyfile(
        """
        def test_cell(kernel, boot_path):
            pass
        """
    )
    pytester.runpytest(catalogue, "--boot-path", "bzimage,bios-grub", "--junitxml=junit.xml")
    properties = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in ET.parse(pytester.path / "junit.xml").getroot().iter("testcase")
    }
    assert properties["test_cell[k-a-bzimage]"]["boot_path"] == "bzimage"
    assert properties["test_cell[k-a-bios-grub]"]["boot_path"] == "bios-grub"
