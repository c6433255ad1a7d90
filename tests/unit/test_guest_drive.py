"""Pure parts of driving the guest: the shell's wire format (run in a real busybox sh on the
host), printk stripping, the exit-code verdict table, and the typed QMP parsers."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from harness import tools
from harness.outcome import Outcome
from harness.vm import exitcode, shell
from harness.vm import state as vmstate


def run_in_busybox(lines: list[str], tmp_path: Path) -> str:
    """Type ``lines`` into a busybox sh on the host, as the console would; its stdout."""
    script = "\n".join(lines) + "\n"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [tools.require("busybox"), "sh"],
        input=script.replace("/run ", f"{tmp_path} "),  # a writable output folder first
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=30,
        check=False,
    )
    return done.stdout


COMMANDS = [
    ("echo out; echo err >&2; (exit 7)", "out\nerr\n", 7),
    ("printf 'no newline'", "no newline", 0),
    ("printf 'a\\n\\n\\n'", "a\n\n\n", 0),
    (
        "cat <<'EOF'\nquote' dquote\" dollar$HOME back\\slash\nEOF",
        "quote' dquote\" dollar$HOME back\\slash\n",
        0,
    ),
    ("echo '[    1.234567] looks like the kernel'", "[    1.234567] looks like the kernel\n", 0),
    (f"echo {'y' * 3000} | wc -c", "3001\n", 0),
    ("seq 1 2000", "".join(f"{i}\n" for i in range(1, 2001)), 0),
]


@pytest.mark.parametrize(("command", "output", "status"), COMMANDS)
def test_wire_format_round_trips_through_a_real_busybox_shell(
    command: str, output: str, status: int, tmp_path: Path
) -> None:
    token = shell.new_token()
    lines = [shell.sync_line("s" + token, console_loglevel=None)]
    lines += shell.command_lines(command, token)
    assert all(len(line) < 1000 for line in lines)  # ash's fgets limit once echo is off
    stdout = run_in_busybox(lines, tmp_path)
    assert shell.sync_tag("s" + token) in stdout
    frame = shell.parse_frame(shell.clean(stdout), token)
    assert frame is not None, stdout[-500:]
    assert (frame.output.decode(), frame.status) == (output, status)


def test_kernel_records_anywhere_in_the_frame_are_removed(tmp_path: Path) -> None:
    token = shell.new_token()
    command = "seq 1 500; echo done"
    lines = [shell.sync_line("s" + token, console_loglevel=None)]
    stdout = run_in_busybox(lines + shell.command_lines(command, token), tmp_path)
    start = stdout.index("==BH" + token)
    rng = random.Random(1234)
    raw = stdout.replace("\n", "\r\n")  # as the tty sends it
    # Insert records at random offsets inside the frame: mid-line, at line starts, in markers.
    offsets = sorted(rng.sample(range(start, len(raw)), 40), reverse=True)
    for n, offset in enumerate(offsets):
        record = f"[{n:5d}.{n:06d}] sd 0:0:0:0: [sda] message {n}\r\n"
        raw = raw[:offset] + record + raw[offset:]
    assert raw.count("message") == 40
    frame = shell.parse_frame(shell.clean(raw), token)
    assert frame is not None
    assert frame.output.decode() == "".join(f"{i}\n" for i in range(1, 501)) + "done\n"
    assert frame.status == 0


def test_foreign_text_in_the_frame_is_an_error_not_wrong_output(tmp_path: Path) -> None:
    token = shell.new_token()
    lines = [shell.sync_line("s" + token, console_loglevel=None)]
    stdout = run_in_busybox(lines + shell.command_lines("seq 1 300", token), tmp_path)
    body_start = stdout.index(":B==\n") + 5
    for foreign in ("acpid: PWRF/00000080\n", "hello\n", "QUJD\n"):
        corrupted = stdout[:body_start] + foreign + stdout[body_start:]
        with pytest.raises(shell.FrameError):
            shell.parse_frame(shell.clean(corrupted), token)


def test_incomplete_frame_or_other_token_is_not_a_result() -> None:
    token = shell.new_token()
    text = f"==BH{token}:B==\nb2sK\n"
    assert shell.parse_frame(text, token) is None
    assert shell.parse_frame(text + f"==BH{token}:E 0 3==\n", token) is not None
    assert shell.parse_frame(text + f"==BH{token}:E 0 3==\n", shell.new_token()) is None


def test_strip_printk_keeps_text_that_only_looks_similar() -> None:
    assert shell.strip_printk("ab[    1.000001] msg\ncd\n") == "abcd\n"
    assert shell.strip_printk("[    2.000000][    T1] caller id\nx\n") == "x\n"
    kept = "[1.5] not a record\n[    1.23456] five decimals\n"
    assert shell.strip_printk(kept) == kept
    # A record not yet ended stays until its line is complete.
    assert shell.strip_printk("[    1.000000] half") == "[    1.000000] half"


def test_sync_and_command_lines_never_show_their_markers_when_echoed() -> None:
    token = shell.new_token()
    typed = shell.sync_line(token, console_loglevel=5) + "".join(
        shell.command_lines("echo x", token)
    )
    for shown in (shell.sync_tag(token), f"==BH{token}:B==", f"==BH{token}:E"):
        assert shown not in typed
    assert '"' not in shell.sync_line(token, console_loglevel=5)


# --- exit codes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "announced", "outcome", "code"),
    [
        (1, 0, Outcome.PASS, 0),
        (1, None, Outcome.INFRA_ERROR, None),  # QEMU's own error exit looks the same
        (7, 3, Outcome.TEST_FAIL, 3),
        (7, None, Outcome.TEST_FAIL, 3),  # a failure is a failure, announced or not
        (7, 2, Outcome.INFRA_ERROR, 3),
        (0, None, Outcome.TEST_FAIL, None),  # powered off without a code
        (2, None, Outcome.INFRA_ERROR, None),
        (-9, None, Outcome.INFRA_ERROR, None),
        (None, None, Outcome.BOOT_TIMEOUT, None),
        (511, 255, Outcome.TEST_FAIL, 255),
    ],
)
def test_exit_status_verdicts(
    status: int | None, announced: int | None, outcome: Outcome, code: int | None
) -> None:
    verdict = exitcode.verdict(status, announced)
    assert (verdict.outcome, verdict.code) == (outcome, code), verdict.reason


@pytest.mark.parametrize("code", [0, 3, 8, 255])
def test_guest_exit_line_writes_the_code_byte_at_the_port_offset(code: int, tmp_path: Path) -> None:
    line = exitcode.guest_exit_line(code, "feedbeef")
    port = tmp_path / "port"
    stdout = run_in_busybox([line.replace("of=/dev/port", f"of={port}")], tmp_path)
    assert stdout == f"[bootharness:feedbeef] EXIT-CODE {code}\n"
    data = port.read_bytes()
    assert len(data) == exitcode.DEBUG_EXIT_PORT + 1 and data[-1] == code


def test_guest_exit_line_refuses_codes_that_are_not_a_byte() -> None:
    with pytest.raises(ValueError, match="0-255"):
        exitcode.guest_exit_line(256, "n")


# --- QMP parsers ------------------------------------------------------------------------


def test_parse_pci_flattens_bridges() -> None:
    answer = [
        {
            "bus": 0,
            "devices": [
                {
                    "bus": 0,
                    "slot": 2,
                    "function": 0,
                    "class_info": {"class": 256, "desc": "SCSI controller"},
                    "id": {"vendor": 6900, "device": 4100},
                    "qdev_id": "scsi0",
                },
                {
                    "bus": 0,
                    "slot": 3,
                    "function": 0,
                    "class_info": {"class": 1540},
                    "id": {"vendor": 6966, "device": 1},
                    "qdev_id": "br0",
                    "pci_bridge": {
                        "bus": {"number": 1},
                        "devices": [
                            {
                                "bus": 1,
                                "slot": 0,
                                "function": 0,
                                "class_info": {"class": 256},
                                "id": {"vendor": 6900, "device": 4098},
                                "qdev_id": "hp-blk",
                            }
                        ],
                    },
                },
            ],
        }
    ]
    found = vmstate.parse_pci(answer)
    assert [(d.address, d.qdev_id) for d in found] == [
        ("00:02.0", "scsi0"),
        ("00:03.0", "br0"),
        ("01:00.0", "hp-blk"),
    ]
    assert found[0].vendor_id == 0x1AF4 and found[0].description == "SCSI controller"


def test_parse_block_reads_inserted_media() -> None:
    answer = [
        {
            "device": "",
            "qdev": "hp-scsi",
            "removable": False,
            "inserted": {"node-name": "n1", "file": "/x.img", "drv": "raw", "ro": True},
        },
        {"device": "cd0", "qdev": "ide1-cd0", "removable": True},
    ]
    disk, cdrom = vmstate.parse_block(answer)
    assert (disk.node_name, disk.filename, disk.driver, disk.read_only) == (
        "n1",
        "/x.img",
        "raw",
        True,
    )
    assert cdrom.filename is None and cdrom.removable and cdrom.device == "cd0"


def test_render_event_log_shows_the_last_events(tmp_path: Path) -> None:
    log = tmp_path / "qmp-events.jsonl"
    events = [{"event": f"E{i}", "data": {"i": i}, "received": 1.0} for i in range(25)]
    log.write_text("".join(json.dumps(e) + "\n" for e in events) + "not json\n")
    text = vmstate.render_event_log(log, limit=5)
    lines = text.splitlines()
    assert lines[0].startswith("(21 earlier events")
    assert lines[1:] == [
        'E21 {"i": 21}',
        'E22 {"i": 22}',
        'E23 {"i": 23}',
        'E24 {"i": 24}',
        "not json",
    ]
    assert vmstate.render_event_log(tmp_path / "missing.jsonl") == ""
