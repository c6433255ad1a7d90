"""Start tests from a booted snapshot: the ready point, mechanisms, and the store in the cache.

- :mod:`~harness.snapshot.plan`: one VM split at the ready point, and its snapshot's key.
- :mod:`~harness.snapshot.store`: snapshot folders, manifests, checks, discarding.
- :mod:`~harness.snapshot.migration`: save a paused VM, load it into a new QEMU.
- :mod:`~harness.snapshot.restore`: create, ensure and restore; ``prepare_vm`` for tests.
- :mod:`~harness.snapshot.spare`: a QEMU started ahead of the next restore of a snapshot.
- :mod:`~harness.snapshot.errors`: every snapshot error means "boot cold instead".

May import every stage up to :mod:`harness.vm`.
"""
