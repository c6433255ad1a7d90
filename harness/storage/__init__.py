"""Disks: controllers as data, disk images and overlays, and attaching them to one VM.

- :mod:`~harness.storage.controllers`: each controller's QEMU devices, guest modules, kernel needs.
- :mod:`~harness.storage.disks`: raw/qcow2 images, file systems from folders, partitions, overlays.
- :mod:`~harness.storage.attach`: a VM's disks planned: overlays, ``-device`` arguments, modules.
- :mod:`~harness.storage.layouts`: a distro root's image on partitions, LVM, RAID1 or LUKS.

May import the foundation, :mod:`harness.kernel` and :mod:`harness.image`.
"""
