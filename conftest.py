"""Project-wide pytest configuration.

The bootharness plugin itself is loaded through its ``pytest11`` entry point (pip install -e .);
this file only adds what the harness's own test suite needs.
"""

pytest_plugins = ["pytester"]
