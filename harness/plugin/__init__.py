"""The pytest plugin: options and settings, fixtures, the test matrix, recording and results.

- :mod:`~harness.plugin.settings`: the run's settings and stash keys (read by all the others).
- :mod:`~harness.plugin.fixtures`: ``kernel``, ``build_initramfs``, ``boot``, ``guest``.
- :mod:`~harness.plugin.matrix`: controller and template parametrization.
- :mod:`~harness.plugin.recorder`: attempts, INFRA_ERROR retries, records and bundles.
- :mod:`~harness.plugin.collector`: results JSON and HTML written by the controller.
- :mod:`~harness.plugin.hooks`: the ``pytest11`` entry point; the one place registering the parts.

May import every stage up to :mod:`harness.report`.
"""
