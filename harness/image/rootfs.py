"""A minimal root file system to switch_root into: busybox and an init that proves it ran.

The folder :func:`build` makes is meant for :func:`harness.storage.disks.filesystem`. Its
``/sbin/init`` (rendered from ``initrd_templates/rootfs-init.sh.j2``) checks that it runs as
PID 1, that ``/`` is a block device's file system and not the initramfs, and that the disk
is this very root (``/etc/bootharness-root`` holds a random identity); it prints
``NEWROOT-INIT``, ``ROOT-MOUNTED <dev> <type> <ro|rw>`` and ``NEWROOT <identity>`` markers,
runs the test's commands, prints ``PASS`` and powers off. Any failed check prints ``FAIL``
with the reason, which the harness reports as TEST_FAIL.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.image import templates
from harness.image.cpio import EntryKind
from harness.image.initramfs import busybox_entries
from harness.outcome import ConfigError

log = logging.getLogger(__name__)

TEMPLATE = "rootfs-init.sh.j2"
IDENTITY_FILE = "etc/bootharness-root"
AFTER_ACTIONS = ("poweroff", "shell", "hold")
_FOLDERS = ("proc", "sys", "dev", "tmp", "run", "root", "etc", "mnt", "sbin", "usr/bin")


@dataclass(frozen=True)
class RootFs:
    """A root folder ready to become a disk, and the identity its init will print."""

    path: Path
    identity: str
    init_script: str


def build(
    folder: Path,
    *,
    commands: Sequence[str] = (),
    after: str = "poweroff",
    identity: str | None = None,
    files: Mapping[str, bytes] | None = None,
    init: str | None = None,
    first_init: bool = False,
) -> RootFs:
    """Fill ``folder`` (created, must be empty) with a minimal root file system.

    ``commands`` are shell snippets the new root's init runs in order after its checks
    (inserted as code; a non-zero status is a FAIL naming the command). ``after`` is what
    the init does once it printed PASS. ``files`` maps paths inside the root to contents.
    ``init`` replaces the harness's ``/sbin/init`` with a script of the test's own (one that
    prints no markers, judged by console patterns; ``commands`` and ``after`` then do nothing).
    ``first_init`` is for roots the kernel mounts itself (NFS root, a RAM disk, a legacy
    initrd's real root): no initramfs init ran before, so this init announces INIT-START.

    Raises:
        ConfigError: the folder is not empty, a bad ``after`` action or file path, or the
            init template does not render.
        MissingToolError: busybox is not installed.
    """
    if after not in AFTER_ACTIONS:
        raise ConfigError(f"rootfs after={after!r}: use one of {', '.join(AFTER_ACTIONS)}")
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise ConfigError(f"rootfs folder {folder} is not empty; give a new folder")
    identity = identity or secrets.token_hex(8)
    script = init
    if script is None:
        script = templates.render(
            TEMPLATE,
            {
                "identity": identity,
                "after": after,
                "commands": list(commands),
                "first_init": first_init,
            },
        )
    for name in _FOLDERS:
        (folder / name).mkdir(parents=True, exist_ok=True)
    _install_busybox(folder)
    init_path = folder / "sbin" / "init"
    init_path.write_text(script)
    init_path.chmod(0o755)
    (folder / IDENTITY_FILE).write_text(identity + "\n")
    (folder / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (folder / "etc" / "group").write_text("root:x:0:\n")
    for relpath, data in (files or {}).items():
        target = (folder / relpath.lstrip("/")).resolve()
        if not target.is_relative_to(folder.resolve()):
            raise ConfigError(f"rootfs file {relpath!r} points outside the root; fix the path")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    log.info("root file system in %s (identity %s)", folder, identity)
    return RootFs(folder, identity, script)


def _install_busybox(folder: Path) -> None:
    """The static busybox and its applet links, the same set the initramfs gets."""
    for entry in busybox_entries():
        target = folder / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.kind is EntryKind.SYMLINK:
            if entry.path == "sbin/init":
                continue
            os.symlink(entry.target, target)
        elif entry.kind is EntryKind.FILE:
            target.write_bytes(entry.data)
            target.chmod(entry.mode)
