"""Distro roots, generator configurations, root images and layouts, without booting: the cache
keys, the generators' configuration files, the errors that name a failed package, the kernel
command line each generator needs per layout, and partitioned layouts read back with the
host's own tools (sfdisk, debugfs)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.image import distro
from harness.image.distro import (
    DistroInitramfs,
    DistroRoot,
    RootSpec,
    generator_config,
)
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError
from harness.storage import layouts
from harness.storage.disks import MIB, DiskImage
from harness.storage.layouts import GuestJob, Layout, LayoutSpec, RootImage
from harness.vm import builder
from harness.vm.distro import CMDLINE, DistroSystem

LUKS_UUID = "117a7281-0ea9-4ba8-9cd5-5953b3713793"
MD_UUID = "def489e2:2de245bf:8571c730:694787af"


# -- roots -----------------------------------------------------------------------------


def test_root_key_follows_every_input() -> None:
    base = RootSpec()
    assert base.key == RootSpec().key
    assert base.with_packages("vim-tiny").key != base.key
    assert RootSpec(snapshot="2026-07-11").key != base.key
    assert RootSpec(hostname="other").key != base.key
    # The order a package list is written in does not make another root.
    assert RootSpec(packages=tuple(reversed(base.packages))).key == base.key


def test_root_spec_refuses_bad_names() -> None:
    with pytest.raises(ConfigError, match="bad package name"):
        RootSpec(packages=("ok", "Not Valid")).validate()
    with pytest.raises(ConfigError, match="host name"):
        RootSpec(hostname="no_underscores").validate()


def test_default_packages_hold_both_generators_and_the_storage_tools() -> None:
    for package in ("systemd-sysv", "initramfs-tools", "dracut-core", "lvm2", "mdadm"):
        assert package in distro.DEFAULT_PACKAGES
    # dracut (not dracut-core) would remove initramfs-tools.
    assert "dracut" not in distro.DEFAULT_PACKAGES


def test_root_identity_changes_with_a_package_version(tmp_path: Path) -> None:
    one = DistroRoot(RootSpec(), tmp_path, {"udev": "252.39-1"}, "date", 0.0, False)
    two = DistroRoot(RootSpec(), tmp_path, {"udev": "252.40-1"}, "date", 0.0, False)
    assert one.identity != two.identity
    assert one.version("udev") == "252.39-1" and one.version("dracut-core") == ""


# mmdebstrap's own output (abridged), as a failed build prints it.
UNKNOWN_PACKAGE = """\
I: automatically chosen mode: unshare
I: running apt-get update...
done
I: downloading packages with apt...
Reading package lists...
E: Unable to locate package bootharness-no-such-package
E: apt-get --yes install bootharness-no-such-package failed
E: mmdebstrap failed to run
"""
CONFIGURE_FAILED = """\
I: installing remaining packages inside the chroot...
Setting up mdadm (4.2-5) ...
dpkg: error processing package mdadm (--configure):
 installed mdadm package post-installation script subprocess returned error exit status 1
Errors were encountered while processing:
 mdadm
E: dpkg failed
"""


def test_a_failed_build_names_the_step_and_the_package() -> None:
    error = distro._build_error(UNKNOWN_PACKAGE.splitlines(), "mmdebstrap", 1)
    assert error.step == "downloading packages with apt"
    assert error.package == "bootharness-no-such-package"
    assert "while downloading packages with apt" in error.message
    assert "E: Unable to locate package bootharness-no-such-package" in error.message
    error = distro._build_error(CONFIGURE_FAILED.splitlines(), "mmdebstrap", 1)
    assert (error.step, error.package) == (
        "installing remaining packages inside the chroot",
        "mdadm",
    )


# -- generators ------------------------------------------------------------------------


def test_initramfs_tools_configuration() -> None:
    config = generator_config("initramfs-tools", modules="list", drivers=("ahci", "ext4"))
    files = config.config_files()
    conf = files["etc/initramfs-tools/conf.d/bootharness"].decode()
    assert "MODULES=list" in conf.splitlines()
    assert files["etc/initramfs-tools/modules"] == b"ahci\next4\n"
    assert config.command("6.1.0-56-amd64", "/out/x") == [
        "mkinitramfs",
        "-o",
        "/out/x",
        "6.1.0-56-amd64",
    ]


def test_dracut_configuration() -> None:
    config = generator_config("dracut", compression="zstd", omit=("plymouth",))
    conf = config.config_files()["etc/dracut.conf.d/90-bootharness.conf"].decode()
    assert 'hostonly="no"' in conf
    assert 'add_dracutmodules+=" lvm mdraid crypt "' in conf
    assert 'omit_dracutmodules+=" plymouth "' in conf
    assert 'compress="zstd"' in conf
    assert "--no-hostonly" in config.command("r", "/out/x")


def test_generator_configuration_is_the_cache_key() -> None:
    most = generator_config("initramfs-tools")
    assert most.key == generator_config("initramfs-tools").key
    assert generator_config("initramfs-tools", modules="netboot").key != most.key
    assert generator_config("initramfs-tools", settings={"RUNSIZE": "20%"}).key != most.key
    assert generator_config("dracut").key != most.key


def test_modules_dep_and_unknown_generators_are_refused() -> None:
    with pytest.raises(ConfigError, match="dep"):
        generator_config("initramfs-tools", modules="dep")
    with pytest.raises(ConfigError, match="unknown initramfs generator"):
        generator_config("booster")
    with pytest.raises(ConfigError, match="inside the root"):
        generator_config("dracut", files={"../etc/passwd": b""})
    with pytest.raises(ConfigError, match="options"):
        generator_config("dracut", colour=True)


def test_generate_refuses_a_root_without_the_generator(tmp_path: Path) -> None:
    kernel = _kernel(tmp_path)
    root = DistroRoot(RootSpec(), tmp_path, {"initramfs-tools-core": "0.142"}, "", 0.0, False)
    with pytest.raises(ConfigError, match="no dracut-core"):
        distro.generate(root, kernel, generator_config("dracut"), tmp_path)


# -- layouts: command lines ------------------------------------------------------------


def _layout(name: str, **fields: str) -> Layout:
    image = DiskImage(Path("/nonexistent"), "qcow2", 1)
    return Layout(LayoutSpec(name), (image,), "key", fs_uuid="f", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("layout", "fields", "initramfs_tools", "dracut"),
    [
        ("gpt", {}, "root=LABEL=root", "root=LABEL=root"),
        ("lvm", {}, "root=LABEL=root", "root=LABEL=root rd.lvm.lv=vg0/root"),
        ("raid1", {"md_uuid": MD_UUID}, "root=LABEL=root", f"root=LABEL=root rd.md.uuid={MD_UUID}"),
        (
            "luks",
            {"luks_uuid": LUKS_UUID},
            f"root=/dev/mapper/root cryptopts=target=root,source=UUID={LUKS_UUID}",
            f"root=LABEL=root rd.luks.uuid={LUKS_UUID}",
        ),
    ],
)
def test_each_generator_gets_the_arguments_it_needs(
    layout: str, fields: dict[str, str], initramfs_tools: str, dracut: str
) -> None:
    built = _layout(layout, **fields)
    assert built.cmdline("initramfs-tools") == initramfs_tools
    assert built.cmdline("dracut") == dracut


def test_key_file_arguments() -> None:
    built = Layout(
        LayoutSpec("luks"),
        (DiskImage(Path("/x"), "qcow2", 1),),
        "key",
        fs_uuid="f",
        luks_uuid=LUKS_UUID,
        keyfile=Path("/x.key"),
    )
    assert built.cmdline("initramfs-tools", keyfile=True).endswith(
        f"source=UUID={LUKS_UUID},key=/etc/bootharness/root.key"
    )
    assert f"rd.luks.key={LUKS_UUID}=/etc/bootharness/root.key" in built.cmdline(
        "dracut", keyfile=True
    )
    assert built.passphrase == "bootharness"
    with pytest.raises(ConfigError, match="no key file"):
        _layout("gpt").cmdline("dracut", keyfile=True)


def test_layout_spec_validation() -> None:
    with pytest.raises(ConfigError, match="unknown disk layout"):
        LayoutSpec("zfs").validate()
    with pytest.raises(ConfigError, match="key derivation"):
        LayoutSpec("luks", kdf="md5").validate()
    with pytest.raises(ConfigError, match="one non-empty line"):
        LayoutSpec("luks", passphrase="").validate()
    assert layouts.select(["all"]) == list(layouts.LAYOUTS)
    assert layouts.select(["luks", "mbr"]) == ["mbr", "luks"]
    with pytest.raises(ConfigError, match="unknown disk layout"):
        layouts.select(["zfs"])


def test_derived_ids_are_stable_and_well_formed() -> None:
    first = layouts.derived_uuid("k", "luks")
    assert first == layouts.derived_uuid("k", "luks") != layouts.derived_uuid("k", "md")
    assert first[14] == "4"  # a version 4 layout: blkid and cryptsetup take it
    pv = layouts._lvm_uuid("k")
    assert [len(g) for g in pv.split("-")] == [6, 4, 4, 4, 4, 4, 6]


# -- layouts built on the host ---------------------------------------------------------


def _kernel(tmp_path: Path) -> Kernel:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"not a kernel")
    modules = tmp_path / "modules" / "6.1.0-test"
    (modules / "kernel").mkdir(parents=True)
    (modules / "modules.dep").write_text("")
    config = tmp_path / "config"
    config.write_text("CONFIG_EXT4_FS=y\n")
    return Kernel("test", "6.1.0-test", vmlinuz, modules, config, None)


@pytest.fixture
def root_image(tmp_path: Path) -> RootImage:
    folder = tmp_path / "root" / "root"
    (folder / "etc").mkdir(parents=True)
    (folder / "etc" / "fstab").write_text("LABEL=root / ext4 defaults 0 1\n")
    (folder / "etc" / "hostname").write_text("bootharness\n")
    root = DistroRoot(RootSpec(), folder, {"udev": "1"}, "", 0.0, False)
    return layouts.root_image(
        root, _kernel(tmp_path), tmp_path / "cache", files={"etc/fstab": b"changed\n"}
    )


def debugfs_cat(image: Path, path: str, offset: int = 0) -> str:
    target = str(image) if offset == 0 else f"{image}?offset={offset}"
    found = shutil.which("debugfs") or "/usr/sbin/debugfs"
    return subprocess.run(
        [found, "-R", f"cat {path}", target], capture_output=True, text=True, check=True
    ).stdout


def test_root_image_adds_the_modules_and_never_writes_the_root(
    tmp_path: Path, root_image: RootImage
) -> None:
    image = root_image.image
    assert root_image.built and image.label == "root" and image.fstype == "ext4"
    assert debugfs_cat(image.path, "/etc/fstab") == "changed\n"
    assert debugfs_cat(image.path, "/etc/hostname") == "bootharness\n"
    assert debugfs_cat(image.path, "/lib/modules/6.1.0-test/modules.dep") == ""
    # The file replaced in the image is still the root's own.
    assert (tmp_path / "root" / "root" / "etc" / "fstab").read_text().startswith("LABEL=root")
    assert image.path.stat().st_mode & 0o222 == 0
    assert image.size % (64 * MIB) == 0


@pytest.mark.parametrize(("layout", "label"), [("mbr", "dos"), ("gpt", "gpt")])
def test_partitioned_layouts_put_the_root_at_one_mebibyte(
    tmp_path: Path, root_image: RootImage, layout: str, label: str
) -> None:
    built = layouts.build(LayoutSpec(layout), root_image, tmp_path / "cache")
    (disk,) = built.disks
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(disk.path)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    assert table["label"] == label
    assert table["partitions"][0]["start"] == 2048
    assert debugfs_cat(disk.path, "/etc/fstab", offset=MIB) == "changed\n"
    # Sparse: only the file system's used blocks take space.
    assert disk.path.stat().st_blocks * 512 < disk.size // 2
    again = layouts.build(LayoutSpec(layout), root_image, tmp_path / "cache")
    assert not again.built and again.disks[0].path == disk.path


def test_guest_layouts_need_a_runner_and_say_what_it_runs(
    tmp_path: Path, root_image: RootImage
) -> None:
    with pytest.raises(ConfigError, match="run_guest"):
        layouts.build(LayoutSpec("lvm"), root_image, tmp_path / "cache")
    jobs: list[GuestJob] = []

    def fake_runner(job: GuestJob) -> None:  # writes what a guest would, to test the plumbing
        jobs.append(job)
        for output in job.outputs:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(output), "1M"], check=True
            )

    built = layouts.build(
        LayoutSpec("raid1"), root_image, tmp_path / "cache", run_guest=fake_runner
    )
    (job,) = jobs
    assert len(job.targets) == 2 and job.source == root_image.image
    assert "mdadm --create /dev/md0" in job.script and f"--uuid={built.md_uuid}" in job.script
    assert len(built.disks) == 2 and all(d.format == "qcow2" for d in built.disks)
    luks = layouts.build(LayoutSpec("luks"), root_image, tmp_path / "cache", run_guest=fake_runner)
    assert luks.keyfile is not None and len(luks.keyfile.read_bytes()) == 64
    assert jobs[-1].files["passphrase"] == b"bootharness"
    assert f"--uuid {luks.luks_uuid}" in jobs[-1].script


def test_builder_commands_are_valid_shell() -> None:
    job = GuestJob("t", (), DiskImage(Path("/x"), "raw", 1), "true")
    commands = builder.guest_commands(job, ["bh-disk0", "bh-disk1", "bh-disk2"])
    script = "\n".join(commands)
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)
    assert "T0=$(bh_dev bh-disk0) && T1=$(bh_dev bh-disk1) && SRC=$(bh_dev bh-disk2)" in script
    assert "chroot /distro /bin/sh -eu /tmp/bh/script" in script


# -- the assembled system ----------------------------------------------------------------


def _system(tmp_path: Path, layout: Layout) -> DistroSystem:
    root = DistroRoot(RootSpec(), tmp_path, {}, "", 0.0, False)
    initramfs = DistroInitramfs(tmp_path / "i.img", "dracut", "d", 0.0, False)
    image = RootImage(DiskImage(tmp_path / "r.ext4", "raw", 1), "k", 0.0, False)
    return DistroSystem(_kernel(tmp_path), root, initramfs, image, layout, {"root": 0.0})


def test_raid_members_span_the_controllers_given(tmp_path: Path) -> None:
    images = (DiskImage(tmp_path / "a", "qcow2", 1), DiskImage(tmp_path / "b", "qcow2", 1))
    raid = Layout(LayoutSpec("raid1"), images, "key", fs_uuid="f", md_uuid=MD_UUID)
    system = _system(tmp_path, raid)
    assert [d.controller for d in system.disks(("ahci", "virtio-scsi"))] == ["ahci", "virtio-scsi"]
    assert [d.controller for d in system.disks(("ahci",))] == ["ahci", "ahci"]
    assert system.layout_dimension == "gpt+raid1"
    assert system.cmdline() == f"root=LABEL=root rd.md.uuid={MD_UUID} {CMDLINE}"
    assert system.built == ()
    with pytest.raises(ConfigError):
        system.disks(())
