"""QEMU's own confinement: the seccomp sandbox, and an unprivileged user when started as root.

A bisect boots arbitrary kernels, and a guest that escapes QEMU owns whatever QEMU is. So,
by default, QEMU runs with its seccomp filter on (``-sandbox on``) denying obsolete system
calls, process creation (``spawn``: no fork or exec), scheduler and priority changes
(``resourcecontrol``) and, when it stays who it is, any change of user or group
(``elevateprivileges``). Started as root, QEMU also drops to an unprivileged user once the
machine is set up (``-runas``; ``-run-with user=`` where QEMU has it).

What that means for the rest of the harness (measured with QEMU 7.2):

* QEMU opens its start-up files (kernel, initrd, disks and overlays, the shared RAM file of a
  snapshot, the console log) *before* it drops privileges: they need no new permissions.
* Anything it would open later gets an open file descriptor instead, sent over QMP: the
  migration stream of a snapshot (``spawn=deny`` forbids ``exec:cat``) and hotplugged disks
  (``add-fd`` and ``/dev/fdset/N``). Nothing in the cache or a test folder is chowned.
* ``elevateprivileges=deny`` (and ``children``) kill QEMU with SIGSYS when it drops privileges
  itself, since the filter is installed first: with a user to drop to it is ``allow``, which
  grants nothing to a process that no longer has privileges (and ``no_new_privs`` is set).
* The kernel clears ``PR_SET_PDEATHSIG`` when QEMU changes its user, so a QEMU that drops
  privileges relies on the lifeline reaper (:mod:`harness.lifeline`) to die with us.
* A sandbox violation kills QEMU with SIGSYS and an empty stderr; :func:`describe_exit` says so.

The user is, in order: the one asked for; ``bootharness`` when that system user exists (the
CI setup creates it); ``nobody``. ``uid:gid`` pairs need no account.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.cache import cache_root, digest, remembered

log = logging.getLogger(__name__)

AUTO = "auto"
DEDICATED_USER = "bootharness"
FALLBACK_USER = "nobody"
SANDBOX_CHOICES = ("on", "off")


@dataclass(frozen=True)
class Sandbox:
    """How QEMU confines itself.

    ``seccomp``: turn QEMU's seccomp filter on. ``user``: whom QEMU runs as after set-up:
    ``auto`` (an unprivileged user when we are root, else ourselves), ``""`` (stay who we
    are), a user name or ``uid:gid``.
    """

    seccomp: bool = True
    user: str = AUTO

    def drop_to(self) -> str:
        """The user QEMU drops to, or ``""`` when it stays who it is."""
        if self.user != AUTO:
            return self.user
        if os.geteuid() != 0:
            return ""
        return default_user()

    def args(self, qemu: str) -> list[str]:
        """QEMU's arguments for this sandbox (none for what ``qemu`` cannot do)."""
        features = qemu_features(qemu)
        user = self.drop_to()
        argv: list[str] = []
        if self.seccomp:
            if features.seccomp:
                elevate = "allow" if user else "deny"
                argv += [
                    "-sandbox",
                    f"on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny",
                ]
            else:
                _warn_once(f"{qemu} has no seccomp sandbox (-sandbox): QEMU runs unconfined")
        if user:
            argv += ["-run-with", f"user={user}"] if features.run_with_user else ["-runas", user]
        return argv


DEFAULT = Sandbox()
OFF = Sandbox(seccomp=False, user="")


def from_options(mode: str, user: str | None) -> Sandbox:
    """The sandbox for ``--qemu-sandbox on|off`` and ``--qemu-user NAME`` (``none``: stay)."""
    if mode == "off":
        return OFF
    if user is None or user == "":
        return DEFAULT
    return Sandbox(user="" if user == "none" else user)


@functools.cache
def default_user() -> str:
    """``bootharness`` if that user exists, else ``nobody``."""
    try:
        pwd.getpwnam(DEDICATED_USER)
    except KeyError:
        return FALLBACK_USER
    return DEDICATED_USER


@dataclass(frozen=True)
class QemuFeatures:
    """What this QEMU binary's confinement options are, read from its ``-help``."""

    seccomp: bool
    run_with_user: bool


@functools.cache
def qemu_features(qemu: str) -> QemuFeatures:
    """Read ``qemu -help`` once per binary (QEMU without seccomp support lacks ``-sandbox``),
    kept as a record in the cache while the binary is unchanged: a process start and its
    parsing in every ``bootharness boot`` otherwise."""
    path = shutil.which(qemu)
    if path is None:
        return _read_features(qemu)
    record = cache_root() / "qemu" / f"features-{digest([path])[:16]}.json"
    try:
        known = remembered(
            record, path, Path(path), lambda: dataclasses.asdict(_read_features(path))
        )
    except OSError:
        return _read_features(qemu)
    return QemuFeatures(bool(known.get("seccomp")), bool(known.get("run_with_user")))


def _read_features(qemu: str) -> QemuFeatures:
    try:
        text = subprocess.run(
            [qemu, "-help"], capture_output=True, text=True, check=False, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("cannot read %s -help (%s); assuming a seccomp build", qemu, error)
        text = "-sandbox"
    run_with = next((line for line in text.splitlines() if line.startswith("-run-with")), "")
    return QemuFeatures(seccomp="-sandbox" in text, run_with_user="user=" in run_with)


def describe_exit(status: int | None) -> str:
    """A word on an exit status the sandbox explains: SIGSYS is a refused system call."""
    if status == -signal.SIGSYS:
        return (
            "killed by SIGSYS: QEMU's seccomp sandbox refused a system call "
            "(rerun with --qemu-sandbox off to confirm, and report the QEMU feature used)"
        )
    return ""


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)
