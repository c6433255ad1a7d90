"""Choose QEMU's accelerator: KVM when it really runs guests, TCG otherwise.

``/dev/kvm`` being present proves little. On some hosts a KVM guest spins in the kernel
forever (QEMU never prints and never exits); on others QEMU dies at once with an MSR error;
where KVM is emulated (kvm_pvm) a tiny guest passes, only some thirty times slower than
under TCG. So before trusting KVM we boot a one-instruction guest under it with a hard
deadline, compare a slow pass with TCG, and remember the verdict per QEMU binary and
host boot, in-process and in a small JSON file that pytest-xdist workers and later runs
share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import lifeline
from harness.cache import cache_root, digest, locked
from harness.outcome import ConfigError, Evidence, InfraError
from harness.tools import require

log = logging.getLogger(__name__)

VALID_REQUESTS = ("auto", "kvm", "tcg")
PROBE_DEADLINE = 5.0  # seconds a KVM probe guest may take before KVM counts as hung
DEFAULT_QEMU = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

# The probe guest writes 0x2a to isa-debug-exit, which makes QEMU exit with
# (0x2a << 1) | 1. Any other way out means the guest did not run as intended.
_EXIT_VALUE = 0x2A
PROBE_EXIT_STATUS = (_EXIT_VALUE << 1) | 1
_DEBUG_EXIT_PORT = 0xF4

# How long to wait for the process group to die after SIGKILL. A process spinning in
# KVM_RUN does honour SIGKILL, but if one ever sits in uninterruptible sleep we must give
# up rather than hang: the decision as a whole has to stay bounded.
_KILL_GRACE = 3.0

# A healthy KVM runs the probe (SeaBIOS, then the boot sector) in ~0.1 s, QEMU's start-up
# included. Measured on a host whose KVM is the software "kvm_pvm" module: the probe passes
# but takes 3.6-5 s of kernel time against 0.13 s under TCG, and a real kernel then never
# prints. So a pass slower than _FAST_ENOUGH is checked against TCG, and KVM is refused
# when it runs the same guest more than _MAX_SLOWDOWN times slower.
_FAST_ENOUGH = 1.0
_MAX_SLOWDOWN = 3.0

# Bump when the meaning of a cache entry changes, so old files are ignored.
_CACHE_VERSION = 1


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator QEMU gets with ``-accel``, what was asked for, and why."""

    name: str
    requested: str
    reason: str


class KvmFallbackWarning(RuntimeWarning):
    """``auto`` fell back to TCG because KVM is present but does not work.

    A separate category so a test suite run with ``-W error`` can still choose to
    ignore it (``-W ignore::harness.vm.accel.KvmFallbackWarning``).
    """


@dataclass(frozen=True)
class _Probe:
    """One probe's verdict. ``hung`` matters for reuse: a hang seen with a short
    deadline says nothing about a longer one."""

    works: bool
    reason: str
    deadline: float
    elapsed: float = 0.0
    hung: bool = False
    argv: tuple[str, ...] = ()
    stderr: str = ""


# In-process memo: the cache key (qemu path, mtime, size, boot id) -> verdict.
_MEMO: dict[str, _Probe] = {}
_MEMO_LOCK = threading.Lock()


def choose_accelerator(
    requested: str,
    *,
    qemu: str | None = None,
    deadline: float = PROBE_DEADLINE,
    cache_dir: Path | None = None,
    kvm_device: Path = KVM_DEVICE,
) -> AccelChoice:
    """Decide between KVM and TCG for ``requested`` ("auto", "kvm" or "tcg").

    "tcg" runs nothing. "kvm" and "auto" boot a tiny guest under KVM (see
    :func:`probe_kvm`) at most once per QEMU binary and host boot: the verdict is
    memoized in-process and stored under ``cache_dir`` (default
    ``cache_root() / "accel"``). "auto" falls back to TCG, with a
    :class:`KvmFallbackWarning` and a log warning, when ``kvm_device`` is unusable or
    the probe fails; the whole decision takes at most ``deadline`` * 4/3 plus the
    time to kill a hung QEMU (measured: 0.04 s; bounded at 3 s).

    Raises:
        ConfigError: ``requested`` is not one of auto, kvm, tcg, or ``deadline`` is not
            positive, or ``qemu`` names a file that does not exist.
        InfraError: "kvm" was requested and KVM is unusable or failed the probe; forcing
            KVM on a broken host must not silently become TCG.
        MissingToolError: QEMU is not installed and a probe was needed.
    """
    if requested not in VALID_REQUESTS:
        raise ConfigError(
            f"accelerator {requested!r} is not valid; use one of: {', '.join(VALID_REQUESTS)}"
        )
    if not deadline > 0:
        raise ConfigError(f"KVM probe deadline must be positive seconds, got {deadline!r}")
    if requested == "tcg":
        return AccelChoice("tcg", requested, "forced by --accel tcg")

    problem = _device_problem(kvm_device)
    if problem is not None:
        if requested == "kvm":
            raise InfraError(
                f"--accel kvm was requested but {problem}; "
                "fix KVM access on this host or use --accel auto or --accel tcg"
            )
        log.info("%s; using TCG", problem)
        return AccelChoice("tcg", requested, f"{problem}; using TCG")

    qemu_path = _resolve_qemu(qemu)
    probe = _probe_once(qemu_path, deadline, cache_dir or cache_root() / "accel")
    if probe.works:
        log.info("using KVM: %s", probe.reason)
        return AccelChoice("kvm", requested, probe.reason)
    if requested == "kvm":
        raise InfraError(
            f"--accel kvm was requested but KVM does not work on this host: {probe.reason}; "
            "use --accel auto or --accel tcg",
            Evidence(
                phase="KVM probe", deadline=probe.deadline, argv=probe.argv, stderr=probe.stderr
            ),
        )
    reason = f"{probe.reason}; using TCG"
    # Said once, by the warning (pytest lists it; the CLI prints it as its own line).
    log.info("%s is present but KVM does not work: %s", kvm_device, reason)
    warnings.warn(reason, KvmFallbackWarning, stacklevel=2)
    return AccelChoice("tcg", requested, reason)


def probe_kvm(qemu: str, deadline: float, workdir: Path) -> tuple[bool, str]:
    """Boot a one-instruction guest under KVM; return (works, reason).

    Works means QEMU exited with :data:`PROBE_EXIT_STATUS` before ``deadline`` seconds,
    and, if that took over a second, no more than 3 times slower than the same guest
    under TCG (an emulated KVM passes slowly and then hangs real kernels). A hang is
    killed (the whole process group, SIGKILL) and reported as not working; any other
    exit is not working and the reason quotes QEMU's stderr. Never raises for a broken
    KVM; the boot image and QEMU's stderr are written into ``workdir``.
    """
    probe = _probe_kvm(qemu, deadline, workdir)
    return probe.works, probe.reason


def _probe_kvm(qemu: str, deadline: float, workdir: Path) -> _Probe:
    probe = _run_probe(qemu, "kvm", deadline, workdir)
    if not probe.works or probe.elapsed <= _FAST_ENOUGH:
        return probe
    # TCG only has to beat KVM by _MAX_SLOWDOWN to condemn it, so it gets no longer than
    # that; this also keeps the whole probe under deadline * (1 + 1/_MAX_SLOWDOWN).
    tcg = _run_probe(qemu, "tcg", probe.elapsed / _MAX_SLOWDOWN, workdir / "tcg")
    if tcg.hung:
        return probe
    if not tcg.works:
        # No yardstick: KVM did pass within the deadline, so do not refuse it on a guess.
        log.warning("TCG reference probe failed (%s); accepting slow KVM", tcg.reason)
        return probe
    reason = (
        f"KVM probe passed but took {probe.elapsed:.2f} s, against {tcg.elapsed:.2f} s "
        "under TCG: KVM is emulated or badly nested here and real guests would crawl or hang"
    )
    return dataclasses.replace(probe, works=False, reason=reason)


def boot_sector() -> bytes:
    """A 512-byte real-mode boot sector that exits QEMU through isa-debug-exit."""
    code = bytes(
        [
            0xB0, _EXIT_VALUE,  # mov al, 0x2a
            0xE6, _DEBUG_EXIT_PORT,  # out 0xf4, al  -> QEMU exits here
            0xFA,  # cli       (only reached if the device is missing:
            0xF4,  # hlt        halt quietly instead of running zeros,
            0xEB, 0xFD,  # jmp hlt   which then shows up as a hang)
        ]
    )  # fmt: skip
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def _run_probe(qemu: str, accel: str, deadline: float, workdir: Path) -> _Probe:
    """Run the probe guest under ``accel``; the accelerator is a parameter so tests can
    prove the guest itself under TCG, which is always available."""
    label = accel.upper()
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "probe-boot.img"
    image.write_bytes(boot_sector())
    # -drive splits its value on commas; a doubled comma is a literal one.
    drive = "file={},format=raw,if=ide".format(str(image).replace(",", ",,"))
    argv = (
        qemu, "-accel", accel, "-machine", "pc", "-nodefaults", "-display", "none",
        "-no-reboot", "-m", "16",
        "-device", f"isa-debug-exit,iobase={_DEBUG_EXIT_PORT:#x},iosize=0x04",
        "-drive", drive, "-serial", "none", "-monitor", "none",
    )  # fmt: skip
    stderr_path = workdir / "probe-stderr.txt"
    start = time.monotonic()
    # stderr goes to a file, not a pipe: a pipe would need a reader thread, and a
    # straggler holding its write end could block that reader after the kill.
    with stderr_path.open("wb") as stderr_file:
        try:
            # A new session puts QEMU and anything it spawns in one process group we
            # can kill as a whole.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                start_new_session=True,
                preexec_fn=lifeline.die_with_parent(),
            )
        except OSError as error:
            reason = f"{label} probe could not start {qemu}: {error}"
            return _Probe(works=False, reason=reason, deadline=deadline, argv=argv)
        lifeline.adopt(proc.pid)  # a KVM guest spinning for ever must not outlive us
        try:
            status = proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            # Also reached on KeyboardInterrupt: never leave the guest running.
            if proc.returncode is None:
                _kill_group(proc)
            if proc.returncode is not None:
                lifeline.release(proc.pid)
    elapsed = time.monotonic() - start
    stderr = _tail(stderr_path)

    base = _Probe(
        works=False, reason="", deadline=deadline, elapsed=elapsed, argv=argv, stderr=stderr
    )
    if status is None:
        reason = f"{label} probe hung for {deadline:.1f} s"
        return dataclasses.replace(base, reason=reason, hung=True)
    if status == PROBE_EXIT_STATUS:
        reason = f"{label} probe passed in {elapsed:.2f} s"
        return dataclasses.replace(base, works=True, reason=reason)
    reason = f"{label} probe failed: qemu {_describe_status(status)} after {elapsed:.2f} s"
    detail = _key_lines(stderr)
    if detail:
        reason += f": {detail}"
    return dataclasses.replace(base, reason=reason)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the probe's process group and reap the leader, bounded by _KILL_GRACE.

    Called only while the leader is unreaped, so its pid (= the group id) cannot have
    been reused by an unrelated process.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=_KILL_GRACE)
    except subprocess.TimeoutExpired:
        log.error(
            "KVM probe qemu (pid %d) did not die %.0f s after SIGKILL; abandoning it",
            proc.pid,
            _KILL_GRACE,
        )


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status} (expected {PROBE_EXIT_STATUS})"


def _tail(path: Path, limit: int = 4096) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace")


def _key_lines(stderr: str) -> str:
    """The last stderr line, preceded by the last line mentioning an error when that one
    differs: QEMU's MSR failure prints the error and then dies on an assertion."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return ""
    errors = [line for line in lines if "error" in line.lower()]
    picked = [errors[-1]] if errors else []
    if lines[-1] not in picked:
        picked.append(lines[-1])
    return " | ".join(line[:300] for line in picked)


def _device_problem(device: Path) -> str | None:
    if not device.exists():
        return f"{device} does not exist (KVM module not loaded, or no virtualization)"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"no read/write access to {device} (add your user to the 'kvm' group)"
    return None


def _resolve_qemu(qemu: str | None) -> str:
    if qemu is None:
        return require(DEFAULT_QEMU)
    if os.sep not in qemu:
        return require(qemu)
    path = Path(qemu)
    if not path.is_file():
        raise ConfigError(f"QEMU binary {qemu} does not exist; pass an existing path or omit it")
    return str(path.resolve())


def _cache_key(qemu: str) -> tuple[str, dict[str, Any]]:
    """Identify a verdict: the exact QEMU binary and this boot of the host (a reboot
    may bring another kernel, KVM module or BIOS setting)."""
    stat = os.stat(qemu)
    try:
        boot_id = BOOT_ID.read_text().strip()
    except OSError:
        boot_id = ""
    fields: dict[str, Any] = {
        "qemu": qemu,
        "mtime_ns": stat.st_mtime_ns,
        "size": stat.st_size,
        "boot_id": boot_id,
    }
    key = digest([str(_CACHE_VERSION), qemu, str(stat.st_mtime_ns), str(stat.st_size), boot_id])
    return key, fields


def _reusable(probe: _Probe, deadline: float) -> bool:
    return not probe.hung or probe.deadline >= deadline


def _probe_once(qemu: str, deadline: float, cache_dir: Path) -> _Probe:
    """The probe verdict for ``qemu``: memo, else cache file, else a real probe.

    A file lock serialises workers, so when several start together one probes and the
    others wait for it and then read its verdict.
    """
    key, fields = _cache_key(qemu)
    with _MEMO_LOCK:
        memo = _MEMO.get(key)
        if memo is not None and _reusable(memo, deadline):
            return memo
        cache_file = cache_dir / f"kvm-probe-{key[:24]}.json"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # Generous: a holder is itself bounded by its deadline plus the kill grace.
            with locked(cache_dir / "kvm-probe.lock", timeout=2 * deadline + 10):
                probe = _locked_probe(qemu, deadline, cache_file, fields)
        except OSError as error:  # includes TimeoutError
            log.warning("KVM probe cache %s unusable (%s); probing without it", cache_dir, error)
            probe = _fresh_probe(qemu, deadline)
        _MEMO[key] = probe
        return probe


def _locked_probe(qemu: str, deadline: float, cache_file: Path, fields: dict[str, Any]) -> _Probe:
    cached = _read_cache(cache_file, fields)
    if cached is not None and _reusable(cached, deadline):
        log.debug("KVM probe verdict from %s: %s", cache_file, cached.reason)
        return cached
    probe = _fresh_probe(qemu, deadline)
    _write_cache(cache_file, fields, probe)
    return probe


def _fresh_probe(qemu: str, deadline: float) -> _Probe:
    with tempfile.TemporaryDirectory(prefix="bootharness-kvm-probe-") as workdir:
        probe = _probe_kvm(qemu, deadline, Path(workdir))
    log.info("KVM probe of %s: %s", qemu, probe.reason)
    return probe


def _read_cache(cache_file: Path, fields: dict[str, Any]) -> _Probe | None:
    try:
        data = json.loads(cache_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable KVM probe cache %s: %s", cache_file, error)
        return None
    try:
        if data.get("version") != _CACHE_VERSION or data.get("key") != fields:
            return None
        verdict = data["verdict"]
        return _Probe(
            works=bool(verdict["works"]),
            reason=str(verdict["reason"]),
            hung=bool(verdict["hung"]),
            deadline=float(verdict["deadline"]),
            elapsed=float(verdict["elapsed"]),
            argv=tuple(str(arg) for arg in verdict.get("argv", ())),
            stderr=str(verdict.get("stderr", "")),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        log.warning("ignoring malformed KVM probe cache %s: %s", cache_file, error)
        return None


def _write_cache(cache_file: Path, fields: dict[str, Any], probe: _Probe) -> None:
    """Write atomically (temporary sibling, then rename): a reader that does not take
    the lock sees the old file or the new one, never half of one."""
    verdict = dataclasses.asdict(probe)
    verdict["argv"] = list(probe.argv)
    payload = {
        "version": _CACHE_VERSION,
        "key": fields,
        "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "verdict": verdict,
    }
    scratch: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", dir=cache_file.parent, prefix=f".{cache_file.name}.", delete=False
        ) as handle:
            scratch = Path(handle.name)
            json.dump(payload, handle, indent=2)
        os.replace(scratch, cache_file)
    except OSError as error:
        log.warning("could not save KVM probe verdict to %s: %s", cache_file, error)
        if scratch is not None:
            scratch.unlink(missing_ok=True)
