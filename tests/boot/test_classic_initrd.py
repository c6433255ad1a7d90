"""The legacy two-phase boot of initrd(4): a filesystem-image initrd, /linuxrc, /dev/ram0,
real-root-dev, the /initrd move, noinitrd; and the install and rescue scenarios built on it.

Every test here needs a kernel with the RAM disk, the initrd and ext2 built in
(``harness.image.legacy_initrd.REQUIREMENTS``): on any other kernel it is skipped with the
missing options named. Where the kernel has dropped the /linuxrc path (Linux 7.0), the test
is skipped with the kernel's own message instead of passing without having run /linuxrc.

The disks hang off AHCI, whose driver is a module on the kernels these tests run on: /linuxrc
(or the RAM disk's own init) loads it from the image, as the classic installers did.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from harness.image import legacy_initrd, rootfs
from harness.image.legacy_initrd import LegacyInitrd
from harness.kernel import capabilities
from harness.kernel.provision import Kernel
from harness.outcome import TestFailure
from harness.storage import disks
from harness.storage.controllers import Disk
from harness.storage.disks import DiskImage
from harness.vm.boot import Vm
from harness.vm.network import SERVICE_ADDRESS, UserNetwork

DISK_MODULES = ("ahci", "sd_mod")
EXPORT = f"{SERVICE_ADDRESS}:/export"
KERNEL_NFS_ROOT = ("CONFIG_ROOT_NFS=y", "CONFIG_IP_PNP=y", "CONFIG_NFS_V4=y", "CONFIG_E1000=y")
SDA = "8:0"  # the first SCSI-class disk: root= by number, the driver is not loaded yet
pytestmark = pytest.mark.kernels("default", "classic", widen=True)


def require_legacy(kernel: Kernel) -> None:
    reason = capabilities.lacks_reason(kernel, legacy_initrd.REQUIREMENTS)
    if reason is not None:
        pytest.skip(reason)


def initrd_for(kernel: Kernel, tmp_path: Path, name: str, **options: object) -> LegacyInitrd:
    source = rootfs.build(tmp_path / f"{name}-src", first_init=True)
    return legacy_initrd.build(kernel, source.path, tmp_path / f"{name}.img.gz", **options)  # type: ignore[arg-type]


def disk_root(
    tmp_path: Path, name: str, *, commands: tuple[str, ...] = (), initrd_dir: bool = False
) -> tuple[rootfs.RootFs, DiskImage]:
    root = rootfs.build(tmp_path / name, commands=commands, first_init=True)
    if initrd_dir:
        (root.path / "initrd").mkdir()
    return root, disks.filesystem(root.path, tmp_path / f"{name}.raw", label=name, size="16M")


def legacy_boot(
    boot, kernel: Kernel, initrd: LegacyInitrd, *, root: str, cmdline: str = "", **options: object
) -> Vm:  # type: ignore[no-untyped-def]
    words = [initrd.cmdline(kernel), cmdline]
    return boot(
        initrd=initrd.path,
        markers=True,
        root=root,
        cmdline=" ".join(w for w in words if w),
        **options,
    )


def console(vm: Vm) -> str:
    return vm.machine.console_log.read_text(errors="replace")


def expect_linuxrc(vm: Vm) -> tuple[int, int]:
    """(pid, uid) /linuxrc ran with; skips with the kernel's own words when the kernel went
    straight on to the real root (a kernel without the /linuxrc path)."""
    event, detail = vm.expect_marker("LINUXRC", "NEWROOT-INIT", phase="init")
    if event == "NEWROOT-INIT":
        said = legacy_initrd.deprecation(console(vm))
        if said is None:
            raise AssertionError("the kernel did not run /linuxrc and said nothing about it")
        pytest.skip(f"this kernel no longer runs /linuxrc: {said}")
    words = detail.split()
    return int(words[1]), int(words[3])


@pytest.mark.parametrize("initrd_dir", [True, False], ids=["initrd-folder", "no-initrd-folder"])
def test_linuxrc_runs_then_the_normal_root_mounts(
    boot, kernel: Kernel, tmp_path: Path, initrd_dir: bool
) -> None:  # type: ignore[no-untyped-def]
    require_legacy(kernel)
    check = (
        "grep -q ' /initrd ' /proc/mounts && test -x /initrd/linuxrc"
        if initrd_dir
        else "! grep -q ' /initrd ' /proc/mounts"
    )
    root, image = disk_root(tmp_path, "bh-normal", commands=(check,), initrd_dir=initrd_dir)
    initrd = initrd_for(kernel, tmp_path, "linuxrc", modules=DISK_MODULES)
    vm = legacy_boot(boot, kernel, initrd, root=SDA, disks=[Disk(image, "ahci")])
    pid, uid = expect_linuxrc(vm)
    assert uid == 0 and pid != 1, f"/linuxrc ran as pid {pid} uid {uid}"
    _, real_root = vm.expect_marker("REAL-ROOT-DEV", phase="init")
    assert real_root == str(8 * 256), "real-root-dev does not hold root= (8:0)"
    vm.expect_marker("LINUXRC-DONE", phase="init")
    _, identity = vm.expect_marker("NEWROOT", phase="init")
    assert identity == root.identity, "the kernel mounted another root than root="
    vm.expect_pass()
    vm.wait_shutdown()
    text = console(vm)
    assert legacy_initrd.LOADED in text
    # The kernel prints the outcome of the move as a line of its own (with a time stamp).
    stamp = r"\s*(?:\[[ \d.]+\] )?"
    moved = rf"Trying to move old root to /initrd \.\.\.{stamp}okay"
    ignored = rf"Trying to move old root to /initrd \.\.\.{stamp}/initrd does not exist\. Ignored\."
    if initrd_dir:
        assert re.search(moved, text), "the kernel did not move the initrd to /initrd"
    else:
        assert re.search(ignored, text) and "Unmounting old root" in text


def test_real_root_dev_written_by_linuxrc_picks_the_root(
    boot, kernel: Kernel, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    require_legacy(kernel)
    _, first = disk_root(tmp_path, "bh-first")
    second_root, second = disk_root(tmp_path, "bh-second")
    initrd = initrd_for(kernel, tmp_path, "switch", modules=DISK_MODULES, real_root="sdb")
    vm = legacy_boot(
        boot, kernel, initrd, root=SDA, disks=[Disk(first, "ahci"), Disk(second, "ahci")]
    )
    expect_linuxrc(vm)
    _, written = vm.expect_marker("SET-REAL-ROOT-DEV", phase="init")
    assert written == str(8 * 256 + 16), "real-root-dev does not hold sdb (8:16)"
    _, identity = vm.expect_marker("NEWROOT", phase="init")
    assert identity == second_root.identity, "the kernel mounted root= instead of real-root-dev"
    vm.expect_pass()
    vm.wait_shutdown()


def test_ram_disk_as_the_root(boot, kernel: Kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    require_legacy(kernel)
    source = rootfs.build(tmp_path / "ram-src", first_init=True)
    initrd = legacy_initrd.build(kernel, source.path, tmp_path / "ram.img.gz")
    vm = legacy_boot(boot, kernel, initrd, root="/dev/ram0")
    _, init = vm.expect_marker("NEWROOT-INIT", phase="init")
    assert init == "pid 1", "the RAM disk's init is not PID 1"
    _, mounted = vm.expect_marker("ROOT-MOUNTED", phase="init")
    # The ext2 image is served by ext2 or, where it is built in, the ext4 driver.
    assert mounted.split()[1] in ("ext2", "ext4") and mounted.split()[2] == "rw", mounted
    _, identity = vm.expect_marker("NEWROOT", phase="init")
    assert identity == source.identity
    vm.expect_pass()
    vm.wait_shutdown()
    text = console(vm)
    assert legacy_initrd.LOADED in text
    assert f"[bootharness:{vm.nonce}] LINUXRC" not in text, "/linuxrc ran with root=/dev/ram0"


def test_install_then_boot_what_was_installed(boot, kernel: Kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An empty 64 MiB disk on AHCI; the installer initrd loads the disk drivers, partitions
    the disk (first partition at 1 MiB), makes the file system, copies the system and points
    real-root-dev at it; the kernel boots the installed system; then a second boot of the same
    disk, with the harness's own initramfs and no installer, reaches the installed init."""
    require_legacy(kernel)
    empty = disks.empty(tmp_path / "empty.qcow2", "64M")
    digest = empty.digest()
    kept = tmp_path / "disk-state.qcow2"
    system = rootfs.build(
        tmp_path / "system",
        first_init=True,
        commands=('test "$(cat /sys/class/block/sda1/start)" = 2048',),
    )
    installer = initrd_for(
        kernel,
        tmp_path,
        "installer",
        modules=DISK_MODULES,
        files={"system": system.path},
        commands=INSTALL,
        real_root="sda1",
        root_wait=20,
    )
    first = legacy_boot(
        boot, kernel, installer, root=SDA, disks=[Disk(empty, "ahci", overlay=kept)]
    )
    expect_linuxrc(first)
    _, written = first.expect_marker("SET-REAL-ROOT-DEV", phase="init")
    assert written == str(8 * 256 + 1), "real-root-dev does not hold sda1 (8:1)"
    _, identity = first.expect_marker("NEWROOT", phase="init")
    assert identity == system.identity
    first.expect_pass()
    first.wait_shutdown()

    second = boot(
        disks=[Disk(empty, "ahci", overlay=kept)],
        variables={"root": "LABEL=installed", "root_fstype": "ext2", "root_wait": 20},
    )
    _, identity = second.expect_marker("NEWROOT", phase="init")
    assert identity == system.identity
    second.expect_pass()
    second.wait_shutdown()
    assert empty.digest() == digest, "the empty base image was written"
    assert first_partition_start(kept, tmp_path) == 2048


# The installer's steps, run by /linuxrc after the disk drivers are loaded: an MBR with one
# Linux partition from sector 2048 to the end, written byte by byte (busybox has no sfdisk).
# Waits up to $2 tenths of a second for the test $1 to hold (device nodes appear late).
WAIT_FOR = (
    'wait_for() { i=0; until eval "$1" || [ $i -ge "$2" ]; do sleep 0.1; i=$((i+1)); done;'
    ' eval "$1"; }'
)
INSTALL = (
    WAIT_FOR,
    "wait_for '[ -b /dev/sda ]' 200",
    "le32() { n=$1; for _ in 1 2 3 4; do"
    ' printf "\\\\$(printf %o $((n % 256)))"; n=$((n / 256)); done; }',
    "sectors=$(cat /sys/class/block/sda/size)",
    "{ printf '\\000\\376\\377\\377\\203\\376\\377\\377'; le32 2048;"
    " le32 $((sectors - 2048)); } | dd of=/dev/sda bs=1 seek=446 conv=notrunc 2>/dev/null",
    "printf '\\125\\252' | dd of=/dev/sda bs=1 seek=510 conv=notrunc 2>/dev/null",
    "blockdev --rereadpt /dev/sda",
    "wait_for '[ -b /dev/sda1 ]' 50",
    "mke2fs -L installed /dev/sda1 >/dev/null",
    "mkdir -p /mnt && mount -t ext2 /dev/sda1 /mnt",
    "cp -a /system/. /mnt/ && sync && umount /mnt",
)


def first_partition_start(overlay: Path, tmp_path: Path) -> int:
    """The first partition's start sector in the MBR the guest wrote (read on the host)."""
    raw = tmp_path / "installed.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(raw)], check=True)
    with raw.open("rb") as image:
        mbr = image.read(512)
    assert mbr[510:512] == b"\x55\xaa", "no MBR signature"
    return int.from_bytes(mbr[446 + 8 : 446 + 12], "little")


def test_rescue_initrd_repairs_a_root_without_init(boot, kernel: Kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A root whose /sbin/init was deleted fails to boot, with the reason; a rescue initrd
    (the RAM disk as its root) mounts the disk and puts the init back; the next boot passes."""
    require_legacy(kernel)
    root = rootfs.build(tmp_path / "broken")
    (root.path / "sbin" / "init").unlink()
    image = disks.filesystem(root.path, tmp_path / "broken.raw", label="bh-broken", size="16M")
    kept = tmp_path / "disk-state.qcow2"
    disk = Disk(image, "ahci", overlay=kept)
    variables = {"root": "LABEL=bh-broken", "root_wait": 20}

    broken = boot(disks=[disk], variables=variables)
    with pytest.raises(TestFailure, match=r"has no executable /sbin/init"):
        broken.expect_pass()
    broken.stop()

    rescue_source = rootfs.build(tmp_path / "rescue-src", first_init=True, commands=RESCUE)
    rescue = legacy_initrd.build(
        kernel,
        rescue_source.path,
        tmp_path / "rescue.img.gz",
        linuxrc=False,
        modules=DISK_MODULES,
        files={"rescue/init": root.init_script.encode()},
    )
    repair = legacy_boot(boot, kernel, rescue, root="/dev/ram0", disks=[disk])
    repair.expect_marker("REPAIRED", phase="init")
    repair.expect_pass()
    repair.wait_shutdown()

    repaired = boot(disks=[disk], variables=variables)
    _, identity = repaired.expect_marker("NEWROOT", phase="init")
    assert identity == root.identity
    repaired.expect_pass()
    repaired.wait_shutdown()


RESCUE = (
    f"for m in $(cat /{legacy_initrd.MODULE_LIST}); do insmod $m || exit 1; done",
    WAIT_FOR,
    "wait_for 'dev=$(findfs LABEL=bh-broken 2>/dev/null)' 200",
    'mkdir -p /mnt && mount -t ext4 "$dev" /mnt',
    "cp /rescue/init /mnt/sbin/init && chmod 755 /mnt/sbin/init && sync && umount /mnt",
    'mark REPAIRED "$dev"',
)


def test_noinitrd_leaves_the_image_at_dev_initrd(
    boot, kernel: Kernel, nfs_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """``noinitrd``: the kernel does not load the image into a RAM disk but, as initrd(4)
    says, leaves its bytes readable once at /dev/initrd (block 1:250). The root comes from
    NFS (the disk drivers are modules, which nothing would load)."""
    require_legacy(kernel)
    capabilities.require_config(kernel, *KERNEL_NFS_ROOT, why="an NFS root without an initrd")
    initrd = initrd_for(kernel, tmp_path, "untouched")
    size = initrd.path.stat().st_size
    root = rootfs.build(
        tmp_path / "nfs-root",
        first_init=True,
        commands=(
            "mknod /dev/initrd b 1 250 2>/dev/null || test -b /dev/initrd",
            f'mark DEV-INITRD "$(head -c {size} /dev/initrd 2>&1 | sha256sum | cut -c1-64)"',
        ),
    )
    server = nfs_server(root.path)
    network = UserNetwork([server.forward()])
    vm = boot(
        initrd=initrd.path,
        markers=True,
        root="/dev/nfs",
        cmdline=f"noinitrd nfsroot={EXPORT},vers=4,tcp rw {network.kernel_ip()}",
        extra_args=network.args(),
    )
    _, seen = vm.expect_marker("DEV-INITRD", phase="init")
    vm.expect_pass()
    vm.wait_shutdown()
    text = console(vm)
    assert legacy_initrd.LOADED not in text, "noinitrd, yet the kernel loaded the RAM disk"
    if seen != hashlib.sha256(initrd.path.read_bytes()).hexdigest():
        zeros = hashlib.sha256(bytes(size)).hexdigest()
        held = "zeros (an empty RAM disk)" if seen == zeros else f"other bytes (sha256 {seen})"
        said = legacy_initrd.deprecation(text) or "the kernel printed nothing about it"
        pytest.skip(
            f"kernel {kernel.name} no longer keeps the image for /dev/initrd after noinitrd: "
            f"block 1:250 holds {held}; {said}"
        )
