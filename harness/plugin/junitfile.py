"""The junit file (``--junitxml``) written whole or not at all.

pytest writes its junit report straight into the file it was given: a run killed while
writing, or a full disk, leaves half an XML file that the CI's test-report step then fails
to parse, losing the night's results. Here pytest is pointed at a temporary sibling, which is
renamed over the real file once pytest has written and closed it (the rename is atomic on
one file system), and pointed back before the terminal summary names it.

Only the junit plugin's public ``logfile`` attribute is used; when pytest's junit plugin is
not active (no ``--junitxml``, an xdist worker) nothing happens.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

log = logging.getLogger(__name__)


class AtomicJunit:
    """Registered by :mod:`harness.plugin.hooks` in the process that writes the junit file."""

    def __init__(self, junit: Any) -> None:
        self.junit = junit
        self.final = Path(str(junit.logfile))
        self.partial = self.final.with_name(f".{self.final.name}.{os.getpid()}.partial")
        junit.logfile = str(self.partial)

    # trylast: inside the terminal's wrapper, so the summary it prints after names the
    # real file.
    @pytest.hookimpl(hookwrapper=True, trylast=True)
    def pytest_sessionfinish(self) -> Generator[None, Any, None]:
        # Around every sessionfinish: pytest's junit plugin writes and closes the temporary
        # file inside; after it, whole, it replaces the real one; broken, it goes.
        outcome = yield
        self.junit.logfile = str(self.final)
        if not self.partial.exists():
            return
        try:
            if outcome.excinfo is not None:
                raise OSError(f"the junit report was not written: {outcome.excinfo[1]}")
            with self.partial.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(self.partial, self.final)
        except OSError as error:
            log.warning("junit report %s left as it was: %s", self.final, error)
            with contextlib.suppress(OSError):
                self.partial.unlink()


def install(config: pytest.Config) -> None:
    """Make the run's junit file atomic (see the module docstring)."""
    for plugin in config.pluginmanager.get_plugins():
        if type(plugin).__name__ == "LogXML" and isinstance(getattr(plugin, "logfile", None), str):
            config.pluginmanager.register(AtomicJunit(plugin), "bootharness-atomic-junit")
            return
