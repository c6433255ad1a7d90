"""Third-party modules that only some paths of a command use, loaded on first use.

A warm ``bootharness boot`` (every cache hit) never renders a template or a boot disk's
GRUB configuration, yet importing Jinja2 was ~16 ms of a start-up of ~0.2 s, paid by every
command, every ``replay`` and every bisect step. A module declares such a dependency at its
top, where a reader looks for imports, with the real import for the type checker::

    if TYPE_CHECKING:
        import jinja2
    else:
        jinja2 = lazyimport.module("jinja2")

The first attribute taken from it imports the module (through the import system's own
locks, so threads may race for it), and every attribute after that is the real one.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


class _Deferred(ModuleType):
    """Stands for a module until its first attribute is asked for."""

    def __getattr__(self, attribute: str) -> Any:
        # Called only for what this stand-in does not hold itself: everything but __name__.
        real = sys.modules.get(self.__name__) or importlib.import_module(self.__name__)
        return getattr(real, attribute)


def module(name: str) -> ModuleType:
    """``name`` if already imported, else a stand-in that imports it on first use.

    A module that is not installed raises ModuleNotFoundError at that first use.
    """
    return sys.modules.get(name) or _Deferred(name)
