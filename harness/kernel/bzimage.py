"""Read an x86 bzImage: its release string, its compressed payload, and the vmlinux inside.

Booting the uncompressed vmlinux through its PVH entry skips both the firmware's real-mode
path and the kernel's self-decompression (3.7 s of xz under TCG for a Debian kernel), so the
harness extracts it once per kernel and caches it. The boot protocol's setup header tells
where the payload is (boot protocol 2.08+, Documentation/arch/x86/boot.rst).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

from harness import compression
from harness.outcome import ConfigError

log = logging.getLogger(__name__)

_HDR_MAGIC_OFFSET = 0x202
_VERSION_OFFSET = 0x206
_KERNEL_VERSION_OFFSET = 0x20E
_PAYLOAD_OFFSET = 0x248
_SETUP_SECTS_OFFSET = 0x1F1

# ELF note that marks a PVH entry point (Xen's ELF note numbering; QEMU looks for it).
_XEN_ELFNOTE_PHYS32_ENTRY = 18
_PT_NOTE = 4
# The MS-DOS header's pointer to the PE header; the EFI stub keeps both in the boot sector.
_PE_POINTER_OFFSET = 0x3C
_PE_PROBE = 0x10000


def _header(data: bytes, path: Path) -> None:
    if len(data) < 0x268 or data[_HDR_MAGIC_OFFSET : _HDR_MAGIC_OFFSET + 4] != b"HdrS":
        raise ConfigError(
            f"{path}: not an x86 bzImage (no 'HdrS' boot header); "
            "point the kernel entry's vmlinuz at arch/x86/boot/bzImage or /boot/vmlinuz-*"
        )


def release_of(path: Path) -> str:
    """The kernel release (``uname -r``) recorded in a bzImage's header.

    Raises:
        ConfigError: the file is not a bzImage or carries no version string.
    """
    data = path.read_bytes()[:0x10000]
    _header(data, path)
    pointer = struct.unpack_from("<H", data, _KERNEL_VERSION_OFFSET)[0]
    if pointer == 0:
        raise ConfigError(f"{path}: the bzImage header has no kernel version string")
    start = pointer + 0x200
    text = data[start : start + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    release = text.split(" ", 1)[0]
    if not release:
        raise ConfigError(f"{path}: empty kernel version string in the bzImage header")
    return release


def payload_of(data: bytes, path: Path) -> bytes:
    """The compressed kernel inside a bzImage."""
    _header(data, path)
    protocol = struct.unpack_from("<H", data, _VERSION_OFFSET)[0]
    if protocol < 0x208:
        raise ConfigError(f"{path}: boot protocol {protocol:#x} is too old to locate the payload")
    setup_sects = data[_SETUP_SECTS_OFFSET] or 4
    offset, length = struct.unpack_from("<II", data, _PAYLOAD_OFFSET)
    start = (setup_sects + 1) * 512 + offset
    return data[start : start + length]


def extract_vmlinux(bzimage: Path) -> bytes:
    """Decompress the vmlinux ELF out of a bzImage.

    Raises:
        ConfigError: not a bzImage, or the payload is not an ELF after decompression.
    """
    data = bzimage.read_bytes()
    payload = payload_of(data, bzimage)
    elf = compression.decompress(payload)
    if elf[:4] != b"\x7fELF":
        raise ConfigError(f"{bzimage}: the decompressed payload is not an ELF file")
    return elf


def has_pvh_entry(elf: bytes) -> bool:
    """True when a 64-bit ELF kernel carries the PVH entry note QEMU needs to boot it directly."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:  # ELFCLASS64 only: x86_64 kernels
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        base = phoff + index * phentsize
        p_type = struct.unpack_from("<I", elf, base)[0]
        if p_type != _PT_NOTE:
            continue
        offset, _, _, filesz = struct.unpack_from("<QQQQ", elf, base + 8)
        if _notes_have_pvh(elf[offset : offset + filesz]):
            return True
    return False


def has_efi_stub(bzimage: Path) -> bool:
    """True when the bzImage is also a PE/COFF image firmware can start: built with
    ``CONFIG_EFI_STUB`` (the setup header then begins with the MS-DOS ``MZ`` signature and
    points at a ``PE\\0\\0`` header; without the stub it begins with a plain boot sector).

    Raises:
        ConfigError: the file is not a bzImage.
    """
    data = bzimage.read_bytes()[:_PE_PROBE]
    _header(data, bzimage)
    if data[:2] != b"MZ":
        return False
    pe_offset = struct.unpack_from("<I", data, _PE_POINTER_OFFSET)[0]
    return data[pe_offset : pe_offset + 4] == b"PE\0\0"


def _notes_have_pvh(notes: bytes) -> bool:
    position = 0
    while position + 12 <= len(notes):
        namesz, descsz, note_type = struct.unpack_from("<III", notes, position)
        name_start = position + 12
        name = notes[name_start : name_start + namesz].rstrip(b"\0")
        if name == b"Xen" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        position = name_start + _align4(namesz) + _align4(descsz)
    return False


def _align4(value: int) -> int:
    return (value + 3) & ~3
