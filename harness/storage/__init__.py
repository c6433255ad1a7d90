"""Disks: controllers as data, disk images and overlays, and attaching them to one VM.

- :mod:`~harness.storage.controllers`: each controller's QEMU devices, guest modules, kernel needs.
- :mod:`~harness.storage.disks`: raw/qcow2 images, file systems from folders, partitions, overlays.
- :mod:`~harness.storage.attach`: a VM's disks planned: overlays, ``-device`` arguments, modules.
- :mod:`~harness.storage.bootpaths`: boot paths as data (pvh, bzimage, bios-grub, uefi-grub,
  uefi-stub), the console patterns of firmware and GRUB, one VM's boot disk.
- :mod:`~harness.storage.firmware`: SeaBIOS and OVMF files; OVMF's variable store per VM.
- :mod:`~harness.storage.layouts`: a distro root's image on partitions, LVM, RAID1 or LUKS.

May import the foundation, :mod:`harness.kernel` and :mod:`harness.image`.
"""
