"""A module declared with ``lazyimport.module`` is imported on first use, and is then the
real module; run in a fresh interpreter, where nothing has imported it yet."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from harness import lazyimport
colorsys = lazyimport.module("colorsys")
assert "colorsys" not in sys.modules, "imported at declaration"
assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
assert "colorsys" in sys.modules and colorsys.hsv_to_rgb is sys.modules["colorsys"].hsv_to_rgb
assert lazyimport.module("colorsys") is sys.modules["colorsys"]  # known: the real one
missing = lazyimport.module("no_such_module_anywhere")
try:
    missing.anything
except ModuleNotFoundError as error:
    print("missing:", error.name)
"""


def test_a_lazy_module_is_imported_on_first_use_only() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "missing: no_such_module_anywhere"
