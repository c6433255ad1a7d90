"""The ``bootharness`` command: one module per command group; imports no pytest.

- :mod:`~harness.cli.main`: the parser and ``kernels``, ``fetch``, ``initramfs``, ``boot``.
- :mod:`~harness.cli.bisect`, :mod:`~harness.cli.matrix`, :mod:`~harness.cli.report`: groups.
- :mod:`~harness.cli.common`: what the commands share; :mod:`~harness.cli.text`: tables.
- :mod:`~harness.cli.fanout`: the CI job matrix from ``kernels.toml``.

The last stage: may import every package except :mod:`harness.plugin`.
"""
