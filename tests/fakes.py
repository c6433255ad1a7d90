"""Small stand-ins shared by the tests: files that parse, not programs that run."""

from __future__ import annotations

import struct
from pathlib import Path


def fake_bzimage(path: Path, release: str = "6.1.0-test") -> Path:
    """The least of a bzImage whose boot header names ``release``."""
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x20F)
    pointer = 0x100
    struct.pack_into("<H", data, 0x20E, pointer)
    text = f"{release} (someone@example) #1 SMP".encode() + b"\0"
    data[pointer + 0x200 : pointer + 0x200 + len(text)] = text
    path.write_bytes(bytes(data))
    return path


def local_catalogue(folder: Path, kernels: dict[str, list[str]]) -> Path:
    """A kernels.toml of local fake kernels ``k-<x>`` (release ``6.1.0-<x>``) with their tags;
    the first one is the default."""
    lines = [f'default = "k-{next(iter(kernels))}"']
    for name, tags in kernels.items():
        fake_bzimage(folder / f"bz-{name}", f"6.1.0-{name}")
        lines.append(f'[kernels."k-{name}"]\nvmlinuz = "bz-{name}"')
        if tags:
            lines.append("tags = [" + ", ".join(f'"{tag}"' for tag in tags) + "]")
    toml = folder / "kernels.toml"
    toml.write_text("\n".join(lines) + "\n")
    return toml
