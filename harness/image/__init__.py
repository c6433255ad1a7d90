"""Images a guest boots from: cpio archives, init templates, our initramfs, root file systems.

- :mod:`~harness.image.cpio`: read and write ``newc`` archives (also concatenated, compressed).
- :mod:`~harness.image.templates`: Jinja2 init scripts, shell-quoted by default, ``sh -n`` checked.
- :mod:`~harness.image.initramfs`: busybox, the kernel's modules, files, /init; cached.
- :mod:`~harness.image.rootfs`: a minimal busybox root to ``switch_root`` into.
- :mod:`~harness.image.foreign`: any image's segments, losslessly; extract, repack, overlay.
- :mod:`~harness.image.mkinitramfs`: Debian's own initramfs-tools images for a cached kernel.
- :mod:`~harness.image.bootdisk`: bootable disks without root: GRUB on MBR, EFI partitions,
  ``grub.cfg`` from a Jinja2 template.
- :mod:`~harness.image.distro`: Debian roots (mmdebstrap) and the initramfs their own
  initramfs-tools or dracut make inside them for a cached kernel; cached.

May import the foundation and :mod:`harness.kernel`.
"""
