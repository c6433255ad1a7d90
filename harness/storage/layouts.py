"""Disk layouts of a real system: the root file system on a partition, LVM, md RAID1 or LUKS2.

Every layout holds the same ext4 root file system, made by :func:`root_image` from a distro
root folder (:mod:`harness.image.distro`) plus the modules tree of the kernel it boots, and
labelled ``root`` (the label the root's fstab names). The layouts put it:

========  ===============================================================================
``disk``  on the whole disk (the file system image itself)
``mbr``   in the first partition of an MBR disk, at 1 MiB
``gpt``   in the first partition of a GPT disk, at 1 MiB
``lvm``   on logical volume ``vg0/root`` of a PV in the first GPT partition
``raid1`` on md RAID1 (metadata 1.2) across the first GPT partitions of two disks
``luks``  in a LUKS2 container in the first GPT partition: a passphrase and a key file
========  ===============================================================================

Partition tables are written on the host (``sfdisk`` on a sparse file). LVM, md and
device-mapper need the guest kernel (the host may have neither loop devices nor
device-mapper), so those layouts are made by a :class:`GuestJob`: a VM boots our own
initramfs with blank target disks and the root image attached, mounts the root image read
only and runs the distribution's own ``lvm``/``mdadm``/``cryptsetup`` from it (``chroot``),
then copies the file system in with ``e2image -ra`` (used blocks only). The harness's
:mod:`harness.vm.builder` runs such jobs; this module only says what to run, so it imports
nothing that boots. Every result is cached by its inputs and made read-only, like every base
image; a VM boots overlays of it.

UUIDs (file system, PV, md array, LUKS header) are derived from the cache key, so the kernel
command line each generator needs (:meth:`Layout.cmdline`) is known without reading a disk.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import time
import uuid as uuid_module
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import cache, tools
from harness.image.distro import ROOT_LABEL, DistroRoot
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError, InfraError
from harness.storage import disks
from harness.storage.disks import MIB, PARTITION_START_SECTOR, SECTOR, DiskImage

log = logging.getLogger(__name__)

LAYOUTS = ("disk", "mbr", "gpt", "lvm", "raid1", "luks")
GUEST_LAYOUTS = ("lvm", "raid1", "luks")
KDFS = ("pbkdf2", "argon2id")
DEFAULT_PASSPHRASE = "bootharness"
KEYFILE_PATH = "etc/bootharness/root.key"  # where a key file goes in the initramfs
LUKS_NAME = "root"  # the mapping initramfs-tools' cryptopts= opens (/dev/mapper/root)
MEMBERS = {"raid1": 2}

_FORMAT = "1"
_META = "layout.json"
_ALIGN = 64 * MIB
# GPT partition type GUIDs (sfdisk accepts them as type=).
_GPT_TYPES = {
    "linux": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    "lvm": "E6D6D379-F507-44C2-A23C-238F2A3DF928",
    "raid": "A19D880F-05FC-4D3B-A006-743F0F84911E",
}
# Room around the file system: the partition start, the GPT backup, and each layer's header
# (LVM: 1 MiB metadata + extent rounding; md: --data-offset=2M; LUKS2: a 16 MiB header).
_OVERHEAD = {"lvm": 16 * MIB, "raid1": 16 * MIB, "luks": 32 * MIB}
# Key derivation: pbkdf2 with the minimum iterations unlocks at once under emulation; argon2id
# (cryptsetup's default kind) with fixed cost keeps unlock time independent of the build host.
_KDF_OPTIONS = {
    "pbkdf2": "--pbkdf pbkdf2 --pbkdf-force-iterations 1000",
    "argon2id": "--pbkdf argon2id --pbkdf-force-iterations 4 --pbkdf-memory 32768 "
    "--pbkdf-parallel 1",
}
# The guest's lvm.conf: no udev in the builder, so LVM makes its own device nodes, and the
# read-only root keeps no metadata backups.
LVM_CONF = """activation {
	udev_sync = 0
	udev_rules = 0
	monitoring = 0
}
devices {
	obtain_device_list_from_udev = 0
}
backup {
	backup = 0
	archive = 0
}
"""
# Modules the builder guest loads: file system, device-mapper, md, dm-crypt's cipher and the
# kernel crypto API cryptsetup uses from user space.
BUILDER_MODULES = ("ext4", "dm_mod", "dm_crypt", "raid1", "xts", "aes", "algif_skcipher")


@dataclass(frozen=True)
class RootImage:
    """The root file system image (ext4, label ``root``) of a distro root for one kernel."""

    image: DiskImage
    key: str  # its cache key: identifies it without reading 1 GB
    seconds: float
    built: bool


def root_image(
    root: DistroRoot,
    kernel: Kernel,
    cache_root: Path,
    *,
    files: Mapping[str, bytes] | None = None,
    size: int | str | None = None,
) -> RootImage:
    """The ext4 image of ``root`` with ``kernel``'s modules tree in ``/lib/modules``; cached.

    ``files`` replace or add files (by path inside the root: an fstab naming a missing
    device, a unit, ...). The folder is assembled with hard links (nothing is copied when
    the cache is one file system) and ``mkfs.ext4 -d`` fills the image without root
    privileges or loop devices. ``size`` defaults to the content plus a quarter, plus
    128 MiB, rounded up to 64 MiB.

    Raises:
        ConfigError: a file path outside the root, a kernel without modules tree, a size
            too small for the content.
        MissingToolError: cp, du, mkfs.ext4 or qemu-img is not installed.
    """
    files = dict(files or {})
    for path in files:
        pieces = Path(path.lstrip("/")).parts
        if not pieces or ".." in pieces:
            raise ConfigError(f"root image file {path!r} must stay inside the root")
    if kernel.modules_dir is None or not kernel.modules_dir.is_dir():
        raise ConfigError(f"kernel {kernel.name} has no modules tree to put in the root image")
    parts: list[str | bytes] = [_FORMAT, "root-image", root.identity, kernel.identity]
    parts += [str(size or "auto"), ROOT_LABEL]
    for path, data in sorted(files.items()):
        parts += [path, data]
    key = cache.digest(parts)
    target = cache_root / "distro" / "images" / f"root-{key[:32]}.ext4"
    started = time.monotonic()

    def build(partial: Path) -> None:
        stage = partial.parent / "stage"
        _link_tree(root.path, stage)
        assert kernel.modules_dir is not None
        modules = stage / "lib" / "modules"
        modules.mkdir(parents=True, exist_ok=True)
        _link_tree(kernel.modules_dir.resolve(), modules / kernel.release)
        for path, data in files.items():
            where = stage / path.lstrip("/")
            where.parent.mkdir(parents=True, exist_ok=True)
            where.unlink(missing_ok=True)  # a hard link to the cached root: never write it
            where.write_bytes(data)
        nbytes = disks.parse_size(size) if size is not None else _auto_size(stage)
        disks.filesystem(
            stage,
            partial,
            size=nbytes,
            fstype="ext4",
            label=ROOT_LABEL,
            uuid=derived_uuid(key, "fs"),
            fmt="raw",
            read_only=False,
        )

    built = cache.build_once(target, build)
    seconds = time.monotonic() - started if built else 0.0
    disks.make_read_only(target)
    image = DiskImage(
        target,
        "raw",
        target.stat().st_size,
        fstype="ext4",
        label=ROOT_LABEL,
        uuid=derived_uuid(key, "fs"),
    )
    return RootImage(image, key, seconds, built)


def _link_tree(source: Path, target: Path) -> None:
    """``cp -al`` (hard links), or a real copy when the two are on different file systems."""
    cp = tools.require("cp")
    result = subprocess.run(
        [cp, "-al", str(source), str(target)], capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        return
    shutil.rmtree(target, ignore_errors=True)
    log.info("cannot hard-link %s (%s); copying", source, result.stderr.strip())
    result = subprocess.run(
        [cp, "-a", str(source), str(target)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise InfraError(f"could not copy {source} to {target}: {result.stderr.strip()}")


def _auto_size(folder: Path) -> int:
    du = tools.require("du")
    out = subprocess.run(
        [du, "-sb", str(folder)], capture_output=True, text=True, check=True
    ).stdout
    content = int(out.split()[0])
    wanted = content + content // 4 + 128 * MIB
    return -(-wanted // _ALIGN) * _ALIGN


def derived_uuid(key: str, what: str) -> str:
    """A UUID (version 4 layout) derived from ``key``: the same inputs give the same UUID."""
    raw = bytearray(bytes.fromhex(cache.digest([key, what])[:32]))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid_module.UUID(bytes=bytes(raw)))


def _lvm_uuid(key: str) -> str:
    """An LVM PV UUID (32 characters in 6-4-4-4-4-4-6 groups) derived from ``key``."""
    text = cache.digest([key, "pv"])[:32]
    groups = (6, 4, 4, 4, 4, 4, 6)
    out, at = [], 0
    for size in groups:
        out.append(text[at : at + size])
        at += size
    return "-".join(out)


@dataclass(frozen=True)
class LayoutSpec:
    """Which layout, and its knobs. Every field goes into the cache key.

    ``kdf`` is the LUKS key derivation (see ``_KDF_OPTIONS``); ``passphrase`` the one the
    harness types at the initramfs's prompt.

    Raises (from :meth:`validate`): ConfigError for an unknown layout or KDF.
    """

    name: str
    passphrase: str = DEFAULT_PASSPHRASE
    kdf: str = "pbkdf2"
    vg: str = "vg0"
    lv: str = "root"

    def validate(self) -> None:
        """Raises ConfigError for an unknown layout or KDF, or bad LVM names."""
        if self.name not in LAYOUTS:
            raise ConfigError(f"unknown disk layout {self.name!r}; use one of {', '.join(LAYOUTS)}")
        if self.kdf not in KDFS:
            raise ConfigError(f"unknown LUKS key derivation {self.kdf!r}; use one of {KDFS}")
        for name in (self.vg, self.lv):
            if not name.replace("_", "").isalnum():
                raise ConfigError(f"LVM name {name!r}: use letters, digits and _")
        if self.name == "luks" and (not self.passphrase or "\n" in self.passphrase):
            raise ConfigError("a LUKS passphrase must be one non-empty line")

    @property
    def members(self) -> int:
        """How many disks the layout spans."""
        return MEMBERS.get(self.name, 1)


@dataclass(frozen=True)
class Layout:
    """A built layout: its disks (in member order) and how to boot from them."""

    spec: LayoutSpec
    disks: tuple[DiskImage, ...]
    key: str
    fs_uuid: str
    luks_uuid: str = ""
    md_uuid: str = ""  # mdadm's notation: four groups of eight hex digits
    keyfile: Path | None = None  # the LUKS key file's bytes (a second key slot)
    seconds: float = 0.0
    built: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def passphrase(self) -> str | None:
        """What to type at the passphrase prompt, for an encrypted layout."""
        return self.spec.passphrase if self.spec.name == "luks" else None

    def cmdline(self, generator: str, *, keyfile: bool = False) -> str:
        """The kernel command line ``generator``'s initramfs needs to find the root.

        ``keyfile`` (LUKS): unlock with the key file at :data:`KEYFILE_PATH` in the initramfs
        instead of asking for the passphrase.

        Raises:
            ConfigError: an unknown generator, or ``keyfile`` for a layout without one.
        """
        if generator not in ("initramfs-tools", "dracut"):
            raise ConfigError(f"no command line known for generator {generator!r}")
        if keyfile and self.keyfile is None:
            raise ConfigError(f"layout {self.name!r} has no key file")
        root = f"root=LABEL={ROOT_LABEL}"
        name = self.spec.name
        if generator == "dracut":
            # dracut assembles md and opens LUKS only when told which (or with rd.auto).
            if name == "lvm":
                return f"{root} rd.lvm.lv={self.spec.vg}/{self.spec.lv}"
            if name == "raid1":
                return f"{root} rd.md.uuid={self.md_uuid}"
            if name == "luks":
                words = [root, f"rd.luks.uuid={self.luks_uuid}"]
                if keyfile:
                    words.append(f"rd.luks.key={self.luks_uuid}=/{KEYFILE_PATH}")
                return " ".join(words)
            return root
        if name == "luks":
            # No crypttab in the root: initramfs-tools' cryptroot reads cryptopts= instead.
            options = f"target={LUKS_NAME},source=UUID={self.luks_uuid}"
            if keyfile:
                options += f",key=/{KEYFILE_PATH}"
            return f"root=/dev/mapper/{LUKS_NAME} cryptopts={options}"
        return root


@dataclass(frozen=True)
class GuestJob:
    """Work a layout needs a guest for (see :mod:`harness.vm.builder`).

    The guest boots with ``targets`` (writable overlays of these base images, in order) and
    ``source`` (the root image) on virtio-blk disks, mounts ``source`` read-only, puts
    ``files`` in ``/tmp/bh`` of that root and runs ``script`` there (``chroot``, ``sh -eu``)
    with ``T0``, ``T1``... (the target disks' device nodes) and ``SRC`` set. The runner
    then writes each target's final content to ``outputs`` (qcow2).
    """

    name: str
    targets: tuple[DiskImage, ...]
    source: DiskImage
    script: str
    files: Mapping[str, bytes] = field(default_factory=dict)
    modules: tuple[str, ...] = BUILDER_MODULES
    outputs: tuple[Path, ...] = ()


GuestRunner = Callable[[GuestJob], None]


def layout_dir(spec: LayoutSpec, root: RootImage, cache_root: Path) -> Path:
    """Where the layout of ``spec`` around ``root`` lives in the cache."""
    return cache_root / "distro" / "layouts" / f"{spec.name}-{_layout_key(spec, root)[:32]}"


def _layout_key(spec: LayoutSpec, root: RootImage) -> str:
    return cache.digest(
        [_FORMAT, root.key, spec.name, spec.passphrase, spec.kdf, spec.vg, spec.lv, LVM_CONF]
    )


def build(
    spec: LayoutSpec,
    root: RootImage,
    cache_root: Path,
    *,
    run_guest: GuestRunner | None = None,
) -> Layout:
    """The layout ``spec`` around ``root``'s file system, built unless it is in the cache.

    ``run_guest`` runs the :class:`GuestJob` of the LVM, RAID1 and LUKS layouts
    (:func:`harness.vm.builder.runner`); not needed for the others, or on a cache hit.

    Raises:
        ConfigError: a bad spec, or a guest layout to build without ``run_guest``.
        InfraError: a host tool failed; whatever ``run_guest`` raises.
    """
    spec.validate()
    if spec.name == "disk":
        return Layout(spec, (root.image,), root.key, fs_uuid=root.image.uuid or "")
    key = _layout_key(spec, root)
    target = layout_dir(spec, root, cache_root)
    started = time.monotonic()

    def make(partial: Path) -> None:
        partial.mkdir()
        if spec.name in GUEST_LAYOUTS:
            if run_guest is None:
                raise ConfigError(
                    f"layout {spec.name!r} is built in a guest: give run_guest "
                    "(harness.vm.builder.runner)"
                )
            _build_in_guest(spec, root, key, partial, run_guest)
        else:
            _build_partitioned(spec, root, partial)
        for image in partial.glob("disk*"):
            disks.make_read_only(image)

    built = cache.build_once(target, make)
    seconds = time.monotonic() - started if built else 0.0
    return _load(spec, root, key, target, seconds, built)


def _load(
    spec: LayoutSpec, root: RootImage, key: str, folder: Path, seconds: float, built: bool
) -> Layout:
    meta = json.loads((folder / _META).read_text())
    images = tuple(DiskImage.open(folder / name, fstype="ext4") for name in meta["disks"])
    images = tuple(
        DiskImage(
            i.path,
            i.format,
            i.size,
            fstype="ext4",
            label=ROOT_LABEL,
            uuid=root.image.uuid,
            partitioned=True,
        )
        for i in images
    )
    keyfile = folder / "root.key"
    return Layout(
        spec=spec,
        disks=images,
        key=key,
        fs_uuid=root.image.uuid or "",
        luks_uuid=str(meta.get("luks_uuid", "")),
        md_uuid=str(meta.get("md_uuid", "")),
        keyfile=keyfile if keyfile.exists() else None,
        seconds=seconds,
        built=built,
    )


def _build_partitioned(spec: LayoutSpec, root: RootImage, folder: Path) -> None:
    table = "dos" if spec.name == "mbr" else "gpt"
    fs_bytes = root.image.path.stat().st_size
    start = PARTITION_START_SECTOR * SECTOR
    total = start + fs_bytes + (MIB if table == "gpt" else 0)
    disk = folder / "disk0.raw"
    partition_disk(disk, total, table, "83" if table == "dos" else _GPT_TYPES["linux"])
    sparse_copy(root.image.path, disk, offset=start)
    (folder / _META).write_text(json.dumps({"disks": [disk.name], "table": table}) + "\n")


def partition_disk(path: Path, size: int, table: str, partition_type: str) -> None:
    """A sparse disk of ``size`` bytes with one partition from 1 MiB to the end.

    Raises:
        InfraError: sfdisk failed.
        MissingToolError: sfdisk is not installed.
    """
    with path.open("wb") as handle:
        handle.truncate(size)
    # A fixed disk identifier: the same inputs give the same table.
    script = f"label: {table}\n"
    script += "label-id: 0x62686469\n" if table == "dos" else ""
    script += f"start={PARTITION_START_SECTOR}, type={partition_type}\n"
    result = subprocess.run(
        [tools.require("sfdisk"), "--no-reread", "--no-tell-kernel", "-q", str(path)],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise InfraError(f"sfdisk could not partition {path}: {result.stderr.strip()}")


def sparse_copy(source: Path, target: Path, *, offset: int, chunk: int = MIB) -> None:
    """Copy ``source`` into ``target`` at ``offset``, skipping all-zero chunks (left holes)."""
    zero = bytes(chunk)
    with source.open("rb") as src, target.open("r+b") as dst:
        position = offset
        while block := src.read(chunk):
            if block != zero[: len(block)]:
                dst.seek(position)
                dst.write(block)
            position += len(block)


def _build_in_guest(
    spec: LayoutSpec, root: RootImage, key: str, folder: Path, run_guest: GuestRunner
) -> None:
    fs_bytes = root.image.path.stat().st_size
    size = PARTITION_START_SECTOR * SECTOR + fs_bytes + _OVERHEAD[spec.name]
    kind = {"lvm": "lvm", "raid1": "raid", "luks": "linux"}[spec.name]
    blanks: list[DiskImage] = []
    for index in range(spec.members):
        blank_path = folder / f"blank{index}.raw"
        partition_disk(blank_path, size, "gpt", _GPT_TYPES[kind])
        blanks.append(DiskImage(blank_path, "raw", size, partitioned=True))
    names = [f"disk{i}.qcow2" for i in range(spec.members)]
    meta: dict[str, object] = {"disks": names}
    files: dict[str, bytes] = {"lvm/lvm.conf": LVM_CONF.encode()}
    if spec.name == "lvm":
        script = _lvm_script(spec, key, fs_bytes)
    elif spec.name == "raid1":
        md_uuid = derived_uuid(key, "md").replace("-", "")
        meta["md_uuid"] = ":".join(md_uuid[i : i + 8] for i in range(0, 32, 8))
        script = _raid1_script(str(meta["md_uuid"]), fs_bytes)
    else:
        meta["luks_uuid"] = derived_uuid(key, "luks")
        keyfile = secrets.token_bytes(64)
        (folder / "root.key").write_bytes(keyfile)
        os.chmod(folder / "root.key", 0o444)
        files["passphrase"] = spec.passphrase.encode()
        files["keyfile"] = keyfile
        script = _luks_script(spec, str(meta["luks_uuid"]), fs_bytes)
    job = GuestJob(
        name=f"layout {spec.name}",
        targets=tuple(blanks),
        source=root.image,
        script=script,
        files=files,
        outputs=tuple(folder / name for name in names),
    )
    run_guest(job)
    for blank in blanks:
        blank.path.unlink()
    (folder / _META).write_text(json.dumps(meta, sort_keys=True) + "\n")


# The scripts run in the distro root (chroot) inside the builder guest, with sh -eu; T0, T1
# and SRC are the target and source disks, /tmp/bh holds the job's files.
_LVM = "LVM_SYSTEM_DIR=/tmp/bh/lvm lvm"


def _lvm_script(spec: LayoutSpec, key: str, fs_bytes: int) -> str:
    lv = f"/dev/{spec.vg}/{spec.lv}"
    return "\n".join(
        (
            f'{_LVM} pvcreate -ff -y --uuid {_lvm_uuid(key)} --norestorefile "${{T0}}1"',
            f'{_LVM} vgcreate {spec.vg} "${{T0}}1"',
            f"{_LVM} lvcreate -y -W n -Z n -n {spec.lv} -L {fs_bytes}b {spec.vg}",
            f'e2image -ra "$SRC" {lv}',
            f"{_LVM} vgchange -an {spec.vg}",
        )
    )


def _raid1_script(md_uuid: str, fs_bytes: int) -> str:
    return "\n".join(
        (
            "mdadm --create /dev/md0 --run --assume-clean --level=1 --raid-devices=2 "
            f"--metadata=1.2 --data-offset=2M --homehost=any --name=root --uuid={md_uuid} "
            '"${T0}1" "${T1}1"',
            f'[ "$(blockdev --getsize64 /dev/md0)" -ge {fs_bytes} ] || '
            '{ echo "md0 is smaller than the file system" >&2; exit 1; }',
            'e2image -ra "$SRC" /dev/md0',
            "mdadm --stop /dev/md0",
        )
    )


def _luks_script(spec: LayoutSpec, luks_uuid: str, fs_bytes: int) -> str:
    kdf = _KDF_OPTIONS[spec.kdf]
    return "\n".join(
        (
            "mkdir -p /run/cryptsetup",
            "cryptsetup luksFormat --batch-mode --type luks2 "
            f'--uuid {luks_uuid} {kdf} --key-file /tmp/bh/passphrase "${{T0}}1"',
            f'cryptsetup luksAddKey --batch-mode {kdf} --key-file /tmp/bh/passphrase "${{T0}}1" '
            "/tmp/bh/keyfile",
            'cryptsetup open --key-file /tmp/bh/passphrase "${T0}1" bhroot',
            f'[ "$(blockdev --getsize64 /dev/mapper/bhroot)" -ge {fs_bytes} ] || '
            '{ echo "the LUKS volume is smaller than the file system" >&2; exit 1; }',
            'e2image -ra "$SRC" /dev/mapper/bhroot',
            "cryptsetup close bhroot",
        )
    )


def select(names: Sequence[str]) -> list[str]:
    """Layout names for ``names`` (``all`` for every one), each once, in table order.

    Raises:
        ConfigError: unknown names, listed with the known ones.
    """
    wanted = list(names) or ["disk"]
    if "all" in wanted:
        return list(LAYOUTS)
    unknown = [n for n in wanted if n not in LAYOUTS]
    if unknown:
        raise ConfigError(
            f"unknown disk layout(s) {', '.join(map(repr, unknown))}; use all or any of "
            f"{', '.join(LAYOUTS)}"
        )
    return [n for n in LAYOUTS if n in wanted]


__all__ = (
    "GUEST_LAYOUTS",
    "LAYOUTS",
    "GuestJob",
    "GuestRunner",
    "Layout",
    "LayoutSpec",
    "RootImage",
    "build",
    "root_image",
)
