"""The nfs_server fixture: every server a test started is stopped when the test ends, whether
it passed, failed or was interrupted, and nothing listens on its port afterwards."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.vm.nfsserver import listening

INNER = """
import subprocess
import sys
import time
from pathlib import Path
import pytest

def test_server_then_{how}(nfs_server, tmp_path):
    (tmp_path / "src").mkdir()
    server = nfs_server(tmp_path / "src")
    Path({record!r}).write_text(str(server.port))
    assert server.running
    {ending}
"""
ENDINGS = {
    "pass": ("pass", {"passed": 1}),
    "fail": ("assert False, 'the test failed'", {"failed": 1}),
    "error": ("raise RuntimeError('the test broke')", {"failed": 1}),
    "interrupt": ("raise KeyboardInterrupt", {}),
}


@pytest.mark.parametrize("how", list(ENDINGS))
def test_nfs_server_is_stopped_however_the_test_ends(pytester: pytest.Pytester, how: str) -> None:
    record = pytester.path / "port"
    ending, outcomes = ENDINGS[how]
    pytester.makepyfile(INNER.format(how=how, record=str(record), ending=ending))
    # A process of its own: a KeyboardInterrupt there must not stop this session.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    if outcomes:
        result.assert_outcomes(**outcomes)
    port = int(Path(record).read_text())
    assert not listening(port), f"something still listens on 127.0.0.1:{port} after the test"


KILLED = """
import sys, time
import subprocess
import sys
import time
from pathlib import Path
from harness.vm.nfsserver import NfsServer
src = Path(sys.argv[1]); src.mkdir()
server = NfsServer(src, Path(sys.argv[2]))
server.start()
print(server.port, flush=True)
time.sleep(600)
"""


def test_nfs_server_dies_with_a_killed_harness(tmp_path: Path) -> None:
    """SIGKILL leaves no teardown to run: the server dies with its parent (PR_SET_PDEATHSIG)."""
    harness = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(tmp_path / "src"), str(tmp_path / "work")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert harness.stdout is not None
        port = int(harness.stdout.readline())
        assert listening(port)
    finally:
        harness.kill()
        harness.wait()
    deadline = time.monotonic() + 10
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not listening(port), f"the NFS server outlived the killed harness on port {port}"
