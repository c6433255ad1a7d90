"""Kernels: the catalogue (``kernels.toml``), provisioning into the cache, and what a kernel is.

- :mod:`~harness.kernel.catalogue`: parse and validate ``kernels.toml`` (every problem at once).
- :mod:`~harness.kernel.provision`: Debian packages or local files into ``Kernel``.
- :mod:`~harness.kernel.modules`: module names to files in load order, from ``modules.dep``.
- :mod:`~harness.kernel.bzimage`: read a bzImage, extract the vmlinux booted through PVH.
- :mod:`~harness.kernel.capabilities`: what a kernel's config can do; skips with the reason.

Imports only the foundation (``harness.outcome``, ``tools``, ``cache``, ``compression``).
"""
