"""The ``bootharness`` command: one module per command group; imports no pytest.

- :mod:`~harness.cli.main`: the entry point; finds the command word and imports only that
  command's module (by name, from its table), so each command loads only what it uses.
- Commands: :mod:`~harness.cli.kernels` (``kernels``, ``fetch``), :mod:`~harness.cli.initramfs`,
  :mod:`~harness.cli.boot`, :mod:`~harness.cli.accel`, :mod:`~harness.cli.bisect`,
  :mod:`~harness.cli.matrix` (``matrix``, ``replay``), :mod:`~harness.cli.report`.
- :mod:`~harness.cli.parsing`: the light parser parts (stdlib only);
  :mod:`~harness.cli.common`: what the commands share; :mod:`~harness.cli.text`: tables.
- :mod:`~harness.cli.fanout`: the CI job matrix from ``kernels.toml``.

The last stage: may import every package except :mod:`harness.plugin`.
"""
