"""bootharness: boot Linux kernels and initramfs images under QEMU; tell whether they still boot."""

__version__ = "0.1.0"
