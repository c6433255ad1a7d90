"""`bootharness boot` options for any initrd and any init, turned into a BootRequest (no boot)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli.common import boot_request, parse_disk
from harness.cli.main import build_parser
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError
from harness.vm.boot import BootRequest
from harness.vm.deadlines import Deadlines


@pytest.fixture
def fake_kernel(tmp_path: Path) -> Kernel:
    image = tmp_path / "vmlinuz"
    image.write_bytes(b"kernel")
    return Kernel("k", "6.1.0-test", image, None, None, None)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    made = {}
    for name in ("initrd.img", "root.img", "hook.sh"):
        made[name] = tmp_path / name
        made[name].write_bytes(b"x")
    return made


def request(kernel: Kernel, *argv: str) -> BootRequest:
    args = build_parser().parse_args(["boot", *argv])
    return boot_request(args, kernel, accel="tcg", deadlines=Deadlines())


def test_an_initrd_with_root_disk_patterns_and_overlay(
    fake_kernel: Kernel, files: dict[str, Path]
) -> None:
    made = request(
        fake_kernel,
        "--initrd", str(files["initrd.img"]), "--root", "LABEL=root",
        "--disk", f"{files['root.img']}:ahci", "--cmdline", "quiet",
        "--expect", "login:", "--fail", "oops", "--no-root-failures",
        "--overlay", f"scripts/init-top/x={files['hook.sh']}",
    )  # fmt: skip
    assert made.initrd == files["initrd.img"] and not made.prints_markers
    assert made.cmdline == "root=LABEL=root quiet"
    assert made.verdict.expect == ("login:",) and made.verdict.fail == ("oops",)
    assert made.verdict.root_failures is False
    assert made.overlay == {"scripts/init-top/x": files["hook.sh"]}
    assert made.storage is not None
    assert [a.controller.name for a in made.storage.plan.attachments] == ["ahci"]
    assert made.initramfs.modules == ()  # the image brings its own drivers


def test_a_template_gets_the_root_and_the_disks_drivers(
    fake_kernel: Kernel, files: dict[str, Path]
) -> None:
    made = request(fake_kernel, "--root", "/dev/vda", "--disk", str(files["root.img"]))
    assert made.initrd is None and made.prints_markers
    assert made.initramfs.variables["root"] == "/dev/vda"
    assert "virtio_blk" in made.initramfs.modules  # the default controller's driver


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["-m", "ahci"], "do not apply"),
        ([], "--expect REGEX"),
    ],
)
def test_refusals_name_the_fix(
    fake_kernel: Kernel, files: dict[str, Path], extra: list[str], why: str
) -> None:
    with pytest.raises(ConfigError, match=why):
        request(fake_kernel, "--initrd", str(files["initrd.img"]), *extra)


def test_a_template_without_markers_needs_expect(fake_kernel: Kernel) -> None:
    with pytest.raises(ConfigError, match="--expect REGEX"):
        request(fake_kernel, "--no-markers")
    assert not request(fake_kernel, "--no-markers", "--expect", "x").prints_markers


def test_disk_controller_suffix(tmp_path: Path) -> None:
    odd = tmp_path / "a:b.img"
    odd.write_bytes(b"x")
    assert parse_disk(f"{odd}:nvme").controller == "nvme"
    assert parse_disk(str(odd)).controller == "virtio-blk"  # ":b.img" names no controller
    with pytest.raises(ConfigError, match="no disk image"):
        parse_disk(str(tmp_path / "missing.img:ahci"))
