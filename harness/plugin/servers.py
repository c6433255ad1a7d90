"""pytest fixtures for the servers a test's guest talks to: an NFS server on the loopback address.

Registered by :mod:`harness.plugin.hooks`. A server is started for the test that asks for it
and stopped when the test ends, passed, failed or interrupted: the fixture's teardown stops
every server it started, and the servers die with the pytest process in any case
(:mod:`harness.vm.nfsserver`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from harness.vm.nfsserver import NfsServer


class StartNfsServer(Protocol):
    def __call__(
        self, source: Path, *, copy: bool = ..., read_only: bool = ..., pseudo: str = ...
    ) -> NfsServer: ...


@pytest.fixture
def nfs_server(bootharness_workdir: Path) -> Iterator[StartNfsServer]:
    """Start NFSv4 servers (nfs-ganesha) on ``127.0.0.1``, each serving a copy of a folder.

    ``nfs_server(folder)`` copies ``folder`` into the test's directory, serves it as
    ``/export`` and returns the started :class:`~harness.vm.nfsserver.NfsServer`; its
    ``forward()`` is the guest forward to pass to a :class:`~harness.vm.network.UserNetwork`
    and its ``export_dir`` the copy the guest writes to. A missing nfs-ganesha is an
    INFRA_ERROR naming the package to install.
    """
    servers: list[NfsServer] = []

    def start(
        source: Path, *, copy: bool = True, read_only: bool = False, pseudo: str = "/export"
    ) -> NfsServer:
        server = NfsServer(
            source,
            bootharness_workdir / f"nfs{len(servers)}",
            copy=copy,
            read_only=read_only,
            pseudo=pseudo,
        )
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
