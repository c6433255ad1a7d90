"""The normal root on NFS (initrd(4)), served by a userspace NFS server the test starts.

The server is nfs-ganesha (NFSv4 only) on 127.0.0.1, exporting a per-test copy of a root
folder; the guest's only network is QEMU's user networking with ``restrict=on`` and one
forward from 10.0.2.100:2049 to that loopback port. Two ways to the root:

- the distributions' way: our initramfs loads the NIC driver and the NFS client, configures
  the interface, mounts the export and switch_roots into it (runs on the Debian kernel, where
  NFS is a module);
- the kernel's own NFS root (``root=/dev/nfs nfsroot=... ip=...``): needs ``ROOT_NFS=y``,
  ``IP_PNP=y`` and a built-in NIC driver, so it runs on a kernel built for it and is skipped
  with the missing option named elsewhere.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from harness.image import legacy_initrd, rootfs
from harness.kernel import capabilities
from harness.kernel.provision import Kernel
from harness.outcome import TestFailure
from harness.vm.deadlines import Deadlines
from harness.vm.network import SERVICE_ADDRESS, UserNetwork
from harness.vm.nfsserver import NfsServer, listening

EXPORT = f"{SERVICE_ADDRESS}:/export"
GUEST_FILE = "written-by-the-guest"
NFS_MODULES = ("e1000", "nfsv4")  # built in on a kernel made for NFS roots: nothing to load
KERNEL_NFS_ROOT = ("CONFIG_ROOT_NFS=y", "CONFIG_IP_PNP=y", "CONFIG_NFS_V4=y", "CONFIG_E1000=y")


def nfs_root(folder: Path, *, first_init: bool = False) -> rootfs.RootFs:
    """A root whose init writes a file into the export (which the host then reads)."""
    return rootfs.build(
        folder,
        first_init=first_init,
        commands=[
            f"echo {GUEST_FILE} > /{GUEST_FILE} && sync",
            f"grep -q {GUEST_FILE} /{GUEST_FILE}",
        ],
    )


def expect_root_on_nfs(vm, root: rootfs.RootFs) -> None:  # type: ignore[no-untyped-def]
    _, mounted = vm.expect_marker("ROOT-MOUNTED", phase="init")
    device, fstype, mode = mounted.split()
    assert device.endswith(":/export") and fstype in ("nfs", "nfs4") and mode == "rw", mounted
    _, identity = vm.expect_marker("NEWROOT", phase="init")
    assert identity == root.identity
    vm.expect_pass()
    vm.wait_shutdown()


def assert_written_to_copy(server: NfsServer, root: rootfs.RootFs) -> None:
    written = server.export_dir / GUEST_FILE
    assert written.read_text() == f"{GUEST_FILE}\n", "the guest's file is not in the export"
    assert written.stat().st_uid == 0, "the guest's root wrote as another user"
    assert not (root.path / GUEST_FILE).exists(), "the guest wrote to the source, not the copy"


@pytest.mark.kernels("default", "classic", widen=True)
def test_nfs_root_the_distributions_way(boot, kernel: Kernel, nfs_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    capabilities.require_config(kernel, "CONFIG_NFS_V4", "CONFIG_E1000", why="an NFSv4 root")
    root = nfs_root(tmp_path / "root")
    server = nfs_server(root.path)
    vm = boot(
        modules=NFS_MODULES,
        variables={"nfs_root": EXPORT},
        extra_args=UserNetwork([server.forward()]).args(),
    )
    _, mounting = vm.expect_marker("NFS-MOUNT", phase="init")
    assert mounting == EXPORT
    expect_root_on_nfs(vm, root)
    assert_written_to_copy(server, root)


@pytest.mark.kernels("default", "classic", widen=True)
def test_nfs_wrong_export_fails_with_the_reason(
    boot, kernel: Kernel, nfs_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    capabilities.require_config(kernel, "CONFIG_NFS_V4", "CONFIG_E1000", why="an NFSv4 root")
    server = nfs_server(nfs_root(tmp_path / "root").path)
    vm = boot(
        modules=NFS_MODULES,
        variables={"nfs_root": f"{SERVICE_ADDRESS}:/no-such-export"},
        extra_args=UserNetwork([server.forward()]).args(),
    )
    with pytest.raises(TestFailure, match=r"cannot mount the NFS root .*/no-such-export") as caught:
        vm.expect_pass()
    assert "No such file or directory" in caught.value.message


@pytest.mark.kernels("default", "classic", widen=True)
def test_kernel_nfs_root(boot, kernel: Kernel, nfs_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``root=/dev/nfs``: the kernel configures the NIC itself (IP_PNP) and mounts the export
    as the root; the initramfs it is given has no /init, so nothing runs before that."""
    capabilities.require_config(kernel, *KERNEL_NFS_ROOT, why="the kernel's own NFS root")
    root = nfs_root(tmp_path / "root", first_init=True)
    server = nfs_server(root.path)
    vm = kernel_nfs_boot(boot, server, tmp_path, EXPORT)
    expect_root_on_nfs(vm, root)
    assert_written_to_copy(server, root)


@pytest.mark.nightly  # the kernel retries the mount for ~95 s (5+10+20+30+30) before it gives up
@pytest.mark.kernels("default", "classic", widen=True)
def test_kernel_nfs_root_wrong_export_names_the_kernel_message(
    boot, kernel: Kernel, nfs_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    capabilities.require_config(kernel, *KERNEL_NFS_ROOT, why="the kernel's own NFS root")
    server = nfs_server(nfs_root(tmp_path / "root", first_init=True).path)
    # The kernel sleeps 5, 10, 20, 30 and 30 s between its tries (NFSROOT_TIMEOUT_*): its
    # kernel phase lasts until it gives up and runs the fallback init.
    vm = kernel_nfs_boot(
        boot, server, tmp_path, f"{SERVICE_ADDRESS}:/no-such-export", Deadlines(kernel=300.0)
    )
    with pytest.raises(TestFailure, match=r"Unable to mount root fs via NFS") as caught:
        vm.expect_pass()
    assert "did not mount its root" in caught.value.message


def kernel_nfs_boot(  # type: ignore[no-untyped-def]
    boot, server: NfsServer, tmp_path: Path, export: str, deadlines: Deadlines | None = None
):
    network = UserNetwork([server.forward()])
    return boot(
        deadlines=deadlines,
        initrd=legacy_initrd.no_init_archive(tmp_path / "no-init.cpio.gz"),
        markers=True,
        root="/dev/nfs",
        cmdline=f"nfsroot={export},vers=4,tcp rw {network.kernel_ip()}",
        extra_args=network.args(),
    )


def test_no_server_is_left_listening(nfs_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The fixture's servers are stopped and their ports free once it is torn down (here, by
    hand, as the teardown does), also when the server was killed or already stopped."""
    (tmp_path / "src").mkdir()
    first = nfs_server(tmp_path / "src")
    second = nfs_server(tmp_path / "src")
    assert first.port != second.port
    assert listening(first.port) and listening(second.port)
    with socket.create_connection(("127.0.0.1", first.port), timeout=2):
        pass
    second.kill()
    first.stop()
    second.stop()
    assert not listening(first.port) and not listening(second.port)
    assert not first.running and not second.running
