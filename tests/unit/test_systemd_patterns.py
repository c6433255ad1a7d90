"""Verdicts on a real system, against real console logs of Debian 12 boots (systemd 252,
initramfs-tools 0.142, dracut 059; tests/data/console/distro-*.log): healthy boots match no
failure row, failing ones name the unit or the generator's line; the login step's prompts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.vm import login, patterns
from harness.vm.patterns import SHIPPED_FAILURES, SYSTEMD, LineWatcher, strip_ansi

DATA = Path(__file__).resolve().parents[1] / "data" / "console"


def log(name: str) -> str:
    return (DATA / name).read_bytes().decode("utf-8", "replace")


@pytest.mark.parametrize(
    "name",
    [
        "distro-initramfs-tools-luks-keyfile-ok.log",
        "distro-dracut-luks-keyfile-ok.log",
        # dracut's "timeout, still waiting for following initqueue hooks" comes before its
        # timeout hooks start the degraded array: not a failure.
        "distro-dracut-degraded-raid1-waiting.log",
    ],
)
def test_healthy_systemd_boots_match_no_failure(name: str) -> None:
    assert patterns.find_failures(log(name)) == []


@pytest.mark.parametrize("generator", ["initramfs-tools", "dracut"])
def test_a_missing_fstab_device_names_the_unit_in_full(generator: str) -> None:
    hit = patterns.first_failure(log(f"distro-{generator}-missing-fstab.log"))
    assert hit is not None
    assert (hit.pattern.source, hit.pattern.name) == (SYSTEMD, "device-timeout")
    assert "systemd[1]: Timed out waiting for device dev-disk-by\\x2dlabel-missing.device" in (
        hit.line
    )
    hits = patterns.find_failures(log(f"distro-{generator}-missing-fstab.log"))
    failed = [h.line for h in hits if h.pattern.name == "dependency-failed"]
    assert any("Dependency failed for mnt-data.mount - /mnt/data." in line for line in failed)


def test_initramfs_tools_says_at_once_that_the_passphrase_was_refused() -> None:
    hit = patterns.first_failure(log("distro-initramfs-tools-wrong-passphrase.log"))
    assert hit is not None
    assert hit.reason == (
        "initramfs-tools luks-passphrase-refused: "
        "cryptsetup: ERROR: root: cryptsetup failed, bad password or options?"
    )


def test_dracut_fails_the_cryptsetup_unit_after_its_tries() -> None:
    text = log("distro-dracut-wrong-passphrase.log")
    hit = patterns.first_failure(text)
    assert hit is not None
    assert hit.pattern.source == SYSTEMD and hit.pattern.name.startswith("unit-failed")
    assert "Failed to start systemd-cr" in hit.line
    # The three prompts came first; the harness answered each.
    prompts = re.findall(login.PASSPHRASE_PROMPTS[1], text[: hit.offset])
    assert len(prompts) == 3


@pytest.mark.parametrize(
    "line",
    [
        # PID 1 reporting things that are not job results.
        "[    5.1] systemd[1]: Failed to find module 'autofs4'",
        # dracut asking systemd for a unit that is not there yet: the boot goes on.
        "[   57.9] dracut-initqueue[347]: Failed to start systemd-cryptsetup@luksx2d1.service: "
        "Unit systemd-cryptsetup@luksx2d1.service not found.",
        "[  OK  ] Reached target cryptsetup.target - Local Encrypted Volumes.",
        "[  OK  ] Started emergency-net.service - A unit named like emergency.",
    ],
)
def test_harmless_lines_are_not_failures(line: str) -> None:
    assert patterns.find_failures(line + "\n") == []


@pytest.mark.parametrize(
    ("line", "row"),
    [
        (
            "[\x1b[0;1;31mFAILED\x1b[0m] Failed to mount "
            "\x1b[0;1;39mmnt-data.mount\x1b[0m - /mnt/data.",
            "unit-failed-status",
        ),
        (
            "[   45.0] systemd[1]: Failed to start systemd-cryptsetup@luks\\x2d1.service - "
            "Cryptography Setup for luks-1.",
            "unit-failed",
        ),
        (
            "[  125.4] systemd[1]: Dependency failed for mnt-data.mount - /mnt/data.",
            "dependency-failed",
        ),
        (
            'You are in emergency mode. After logging in, type "journalctl -xb" to view',
            "emergency-mode",
        ),
    ],
)
def test_systemd_failure_lines(line: str, row: str) -> None:
    hit = patterns.first_failure(line + "\n")
    assert hit is not None and hit.pattern.name == row
    assert "\x1b" not in hit.reason


def test_the_maintenance_prompt_is_seen_before_its_newline() -> None:
    watcher = LineWatcher(SHIPPED_FAILURES)
    hits, _ = watcher.feed(
        "Cannot open access to console.\r\nPress Enter for maintenance\r\n(or pr"
    )
    assert [h.pattern.name for h in hits] == ["maintenance-prompt"]


def test_escapes_go_even_when_systemd_cut_one_in_half() -> None:
    assert strip_ansi("[\x1b[0;1;31m TIME \x1b[0m] device \x1b[0;1;… - /dev/x.") == (
        "[ TIME ] device … - /dev/x."
    )


# -- the login step's prompts, as the console shows them -----------------------------------


def test_login_prompt() -> None:
    prompt = re.compile(login.LOGIN_PROMPT)
    text = log("distro-initramfs-tools-luks-keyfile-ok.log")
    match = prompt.search(text)
    assert match is not None and match.group(0).strip() == "bootharness login:"
    assert prompt.search("Starting systemd-user-sessions.service - Permit User Sessions...") is None


@pytest.mark.parametrize(
    ("name", "index"),
    [("distro-initramfs-tools-wrong-passphrase.log", 0), ("distro-dracut-wrong-passphrase.log", 1)],
)
def test_passphrase_prompts_of_both_generators(name: str, index: int) -> None:
    asks = re.compile(login.PASSPHRASE_PROMPTS[index])
    found = asks.search(log(name))
    assert found is not None, name
    other = re.compile(login.PASSPHRASE_PROMPTS[1 - index])
    assert other.search(log(name)) is None
