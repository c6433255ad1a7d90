"""A userspace NFS server for one test: nfs-ganesha, NFSv4 only, on the loopback address.

The host's own kernel may have no nfsd (it has none on these machines), and a kernel server
would be global state anyway; nfs-ganesha with its VFS back end runs as a plain process the
harness owns. Each :class:`NfsServer` serves one folder, a copy of the test's root made in the
test's own directory (the guest writes there, the source stays as it was), from
``127.0.0.1:<free port>`` only.

Why NFSv4 only: NFSv3 needs the portmapper, and ganesha refuses to start when it cannot
register with one ("Cannot register NFS V3 on TCP"); rpcbind listens on port 111 of every
address. NFSv4 needs one TCP port, which one QEMU ``guestfwd`` rule reaches
(:meth:`NfsServer.forward`). Delegations stay off: with them ganesha would probe an NFSv4.0
client's callback address, which is the guest's private address, from the host.

The process runs in a session of its own and dies with the harness (``PR_SET_PDEATHSIG``),
every exit path stops it (SIGTERM, then SIGKILL, each bounded), and :meth:`NfsServer.stop`
returns only when nothing listens on its port any more.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path

from harness import tools
from harness.outcome import ConfigError, InfraError, MissingToolError
from harness.vm.network import GuestForward

log = logging.getLogger(__name__)

PROGRAM = "ganesha.nfsd"
# Where Debian (and others) put the VFS back end; ganesha's compiled-in default is lib64.
PLUGIN_DIRS = (
    Path("/usr/lib/x86_64-linux-gnu/ganesha"),
    Path("/usr/lib64/ganesha"),
    Path("/usr/lib/ganesha"),
)
NFS_PORT = 2049  # where the guest expects the server
PSEUDO = "/export"  # the path the guest mounts: <address>:/export
READY_LINE = "NFS SERVER INITIALIZED"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1
_START_ATTEMPTS = 3  # a free port can be taken by someone else before ganesha binds it

_CONFIG = """\
# nfs-ganesha configuration written by bootharness for one test: NFSv4 only, loopback only.
NFS_CORE_PARAM {{
    Bind_addr = 127.0.0.1;
    NFS_Port = {port};
    Protocols = 4;
    Enable_UDP = false;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Plugins_Dir = {plugins};
}}
NFSv4 {{
    Graceless = true;
    Delegations = false;
    Only_Numeric_Owners = true;
    RecoveryBackend = fs;
    RecoveryRoot = {recovery};
}}
EXPORT {{
    Export_Id = 1;
    Path = {export};
    Pseudo = {pseudo};
    Protocols = 4;
    Transports = TCP;
    Access_Type = {access};
    Squash = No_Root_Squash;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"""


def plugin_dir() -> Path:
    """The folder holding ganesha's VFS back end (``libfsalvfs.so``).

    Raises:
        MissingToolError: the back end is not installed (package nfs-ganesha-vfs).
    """
    for folder in PLUGIN_DIRS:
        if (folder / "libfsalvfs.so").is_file():
            return folder
    raise MissingToolError("libfsalvfs.so (ganesha's VFS back end)", "nfs-ganesha-vfs")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _die_with_harness(parent: int) -> None:
    """Runs in the child before exec: SIGKILL the server when the harness process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the harness died before prctl took effect
        os._exit(1)


_LIVE: weakref.WeakSet[NfsServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.kill()


class NfsServer:
    """One nfs-ganesha process serving one folder over NFSv4 on ``127.0.0.1:port``.

    ``source`` is copied to ``workdir/export`` (symlinks, modes and owners kept) unless
    ``copy`` is False, in which case ``source`` itself is served (and written to). A context
    manager: leaving it stops the server, also on errors.
    """

    def __init__(
        self,
        source: Path,
        workdir: Path,
        *,
        copy: bool = True,
        read_only: bool = False,
        pseudo: str = PSEUDO,
    ) -> None:
        if not source.is_dir():
            raise ConfigError(f"NFS export source {source} is not a folder")
        if not pseudo.startswith("/") or pseudo == "/":
            raise ConfigError(f"NFS pseudo path {pseudo!r} must be an absolute path below /")
        self.source = Path(source)
        self.workdir = Path(workdir)
        self.copy = copy
        self.read_only = read_only
        self.pseudo = pseudo
        self.export_dir = self.workdir / "export" if copy else self.source
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "ganesha.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "ganesha.log"

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def forward(self, guest_port: int = NFS_PORT) -> GuestForward:
        """The guest forward that makes this server the guest's ``10.0.2.100:2049``."""
        if not self.port:
            raise ConfigError("the NFS server has no port yet: start it before the VM")
        return GuestForward(host_port=self.port, guest_port=guest_port)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Copy the export, write the configuration and start the server; wait until it serves.

        Raises:
            MissingToolError: nfs-ganesha or its VFS back end is not installed.
            InfraError: the server exited or did not come up in ``timeout`` seconds (the
                message has the end of its log).
        """
        if self.process is not None:
            raise InfraError("NFS server started twice")
        program = tools.require(PROGRAM)
        plugins = plugin_dir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.copy:
            if self.export_dir.exists():
                shutil.rmtree(self.export_dir)
            shutil.copytree(self.source, self.export_dir, symlinks=True)
        (self.workdir / "recovery").mkdir(exist_ok=True)
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = free_port()
            self._write_config(plugins)
            self._launch(program)
            try:
                self._wait_ready(timeout)
                log.info("NFS server pid %d on 127.0.0.1:%d", self.pid, self.port)
                return
            except InfraError:
                self.kill()
                if attempt == _START_ATTEMPTS or "bind" not in self.log_tail().lower():
                    raise
                log.warning("NFS server port %d was taken; trying another", self.port)

    @property
    def pid(self) -> int:
        assert self.process is not None, "NFS server not started"
        return self.process.pid

    def _write_config(self, plugins: Path) -> None:
        text = _CONFIG.format(
            port=self.port,
            plugins=plugins,
            recovery=self.workdir / "recovery",
            export=self.export_dir.resolve(),
            pseudo=self.pseudo,
            access="RO" if self.read_only else "RW",
        )
        self.config_path.write_text(text)

    def _launch(self, program: str) -> None:
        self.log_path.unlink(missing_ok=True)
        argv = [
            program,
            "-F",  # foreground: the harness owns the process, not a daemonized grandchild
            "-f",
            str(self.config_path),
            "-L",
            str(self.log_path),
            "-p",
            str(self.workdir / "ganesha.pid"),
            "-N",
            "NIV_EVENT",
        ]
        parent = os.getpid()
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _die_with_harness(parent),
        )
        _LIVE.add(self)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise InfraError(
                    f"nfs-ganesha exited with status {self.process.returncode} at start; "
                    f"its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            if READY_LINE in self._log_text() and listening(self.port):
                return
            time.sleep(0.05)
        raise InfraError(
            f"nfs-ganesha did not serve on 127.0.0.1:{self.port} within {timeout:.0f}s; "
            f"its log ({self.log_path}) ends:\n{self.log_tail()}"
        )

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (ganesha shuts down cleanly), then SIGKILL; return once the port is free.

        Raises:
            InfraError: something still listens on the port afterwards.
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("NFS server pid %d ignored SIGTERM; killing it", self.pid)
                self.kill()
        self._reap()
        deadline = time.monotonic() + timeout
        while listening(self.port):
            if time.monotonic() > deadline:
                raise InfraError(f"127.0.0.1:{self.port} still listens after the NFS server")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server's whole session at once (no wait for a clean shutdown)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal(signal.SIGKILL)
        self._reap()

    def _signal(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def _reap(self) -> None:
        assert self.process is not None
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("NFS server pid %d did not die", self.process.pid)
        _LIVE.discard(self)

    def __enter__(self) -> NfsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
