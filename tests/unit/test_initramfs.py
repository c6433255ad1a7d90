"""Tests of harness.image.initramfs with a fake kernel: caching, determinism, content, modules.

The kernel is a stand-in (any file as vmlinuz, release ``6.1.0-test``); modules come from a
synthetic ``lib/modules`` tree of fake ``.ko`` files that only carry a ``vermagic=`` string.
Nothing boots; the real busybox goes into every image.
"""

from __future__ import annotations

import lzma
import os
import re
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from harness import compression, tools
from harness.image import cpio, initramfs
from harness.image.cpio import Entry, EntryKind
from harness.image.initramfs import Initramfs, InitramfsSpec
from harness.kernel.modules import VermagicMismatchError
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError

RELEASE = "6.1.0-test"
VERMAGIC = b"\x00vermagic=6.1.0-test SMP mod_unload \x00"
MODULES = f"lib/modules/{RELEASE}"


def fake_kernel(
    tmp_path: Path, *, modules_dir: Path | None = None, config_path: Path | None = None
) -> Kernel:
    vmlinuz = tmp_path / "vmlinuz"
    if not vmlinuz.exists():
        vmlinuz.write_bytes(b"not really a kernel")
    return Kernel(
        name="fake",
        release=RELEASE,
        vmlinuz=vmlinuz,
        modules_dir=modules_dir,
        config_path=config_path,
        system_map=None,
    )


def build(kernel: Kernel, cache: Path, **spec: object) -> Initramfs:
    return initramfs.build(kernel, InitramfsSpec(**spec), cache)  # type: ignore[arg-type]


def entries_of(image: Initramfs) -> dict[str, Entry]:
    entries = cpio.read_archive(image.path.read_bytes())
    by_path = {entry.path: entry for entry in entries}
    assert len(by_path) == len(entries), "a path is stored twice"
    return by_path


def insmod_paths(init: str) -> list[str]:
    return re.findall(r"^insmod (\S+) \|\|", init, flags=re.MULTILINE)


# -- caching and determinism ------------------------------------------------------------------


def test_same_spec_twice_is_a_cache_hit_with_the_same_bytes(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path)
    first = build(kernel, tmp_path / "cache", variables={"commands": ["echo hi"]})
    data = first.path.read_bytes()
    stamp = first.path.stat().st_mtime_ns
    second = build(kernel, tmp_path / "cache", variables={"commands": ["echo hi"]})
    assert first.built is True
    assert second.built is False
    assert second.path == first.path
    assert second.digest == first.digest
    assert second.path.read_bytes() == data
    assert second.path.stat().st_mtime_ns == stamp  # not rewritten
    assert second.init_script == first.init_script
    assert first.path.parent == tmp_path / "cache" / "initramfs"


def test_different_content_is_a_different_cache_entry(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path)
    one = build(kernel, tmp_path / "cache", variables={"commands": ["echo one"]})
    two = build(kernel, tmp_path / "cache", variables={"commands": ["echo two"]})
    three = build(kernel, tmp_path / "cache", files={"etc/x": b"1"})
    four = build(kernel, tmp_path / "cache", files={"etc/x": b"2"})
    assert two.built and four.built
    assert len({one.path, two.path, three.path, four.path}) == 4
    assert b"echo two" in entries_of(two)["init"].data
    assert entries_of(four)["etc/x"].data == b"2"


def test_fresh_cache_folders_give_byte_identical_files(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path)
    spec = {"variables": {"commands": ["echo hi"]}, "files": {"etc/motd": b"hello\n"}}
    one = build(kernel, tmp_path / "one", **spec)
    two = build(kernel, tmp_path / "two", **spec)
    assert one.built and two.built
    assert one.path.name == two.path.name
    assert one.path.read_bytes() == two.path.read_bytes()


def test_source_date_epoch_changes_the_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = fake_kernel(tmp_path)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    plain = build(kernel, tmp_path / "cache", compression="none")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = build(kernel, tmp_path / "cache", compression="none")
    assert dated.built
    assert dated.path != plain.path
    plain_bytes, dated_bytes = plain.path.read_bytes(), dated.path.read_bytes()
    assert plain_bytes != dated_bytes
    assert len(plain_bytes) == len(dated_bytes)  # only the mtime fields differ
    # The first member's header: magic, ino, mode, uid, gid, nlink, then mtime.
    assert plain_bytes[46:54] == b"00000000"
    assert dated_bytes[46:54] == b"%08X" % 1700000000
    assert cpio.list_paths(plain_bytes) == cpio.list_paths(dated_bytes)


def test_invalid_source_date_epoch_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH"):
        build(fake_kernel(tmp_path), tmp_path / "cache")


# -- content ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", compression.METHODS)
def test_every_compression_builds_and_reads_back(tmp_path: Path, method: str) -> None:
    image = build(fake_kernel(tmp_path), tmp_path / "cache", compression=method)
    data = image.path.read_bytes()
    assert compression.detect(data) == method
    assert image.path.name.endswith(".cpio" if method == "none" else f".cpio.{method}")
    entries = entries_of(image)

    init = entries["init"]
    assert (init.kind, init.mode) == (EntryKind.FILE, 0o755)
    assert init.data == image.init_script.encode()

    busybox = Path(tools.require("busybox"))
    assert entries["bin/busybox"].kind is EntryKind.FILE
    assert entries["bin/busybox"].mode == 0o755
    assert entries["bin/busybox"].data == busybox.read_bytes()

    applets = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "bin/sh" in applets
    for applet in applets:
        if applet in ("linuxrc", "sbin/init", "bin/busybox"):
            continue
        entry = entries[applet]
        assert entry.kind is EntryKind.SYMLINK, applet
        assert entry.target == "/bin/busybox"
    # Our /init is the only init: no busybox init or initrd-style linuxrc beside it.
    assert "linuxrc" not in entries
    assert "sbin/init" not in entries

    console = entries["dev/console"]
    assert console.kind is EntryKind.CHARDEV
    assert console.rdev == (5, 1)
    for folder in ("proc", "sys", "dev", "tmp", "newroot"):
        assert entries[folder].kind is EntryKind.DIR


def test_extra_files_land_with_the_right_modes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "run.sh").chmod(0o700)
    (tree / "data.txt").write_text("data\n")
    (tree / "data.txt").chmod(0o600)
    (tree / "sub" / "deep").write_bytes(b"\x00\x01binary")
    (tree / "link").symlink_to("run.sh")
    (tree / "dangling").symlink_to("/no/such/target")
    (tree / "sub").chmod(0o750)
    tree.chmod(0o755)

    image = build(
        fake_kernel(tmp_path),
        tmp_path / "cache",
        files={"etc/hello": b"hello\n", "/opt/tree": tree, "usr/bin/tool": tree / "run.sh"},
    )
    entries = entries_of(image)
    hello = entries["etc/hello"]
    assert (hello.kind, hello.mode, hello.data) == (EntryKind.FILE, 0o644, b"hello\n")

    assert (entries["opt/tree"].kind, entries["opt/tree"].mode) == (EntryKind.DIR, 0o755)
    # Folder modes are normalised like file modes: the same bytes whatever the umask.
    assert (entries["opt/tree/sub"].kind, entries["opt/tree/sub"].mode) == (EntryKind.DIR, 0o755)
    script = entries["opt/tree/run.sh"]
    assert (script.kind, script.mode) == (EntryKind.FILE, 0o755)
    assert script.data == b"#!/bin/sh\necho hi\n"
    data = entries["opt/tree/data.txt"]
    assert (data.kind, data.mode, data.data) == (EntryKind.FILE, 0o644, b"data\n")
    assert entries["opt/tree/sub/deep"].data == b"\x00\x01binary"
    assert entries["opt/tree/link"].kind is EntryKind.SYMLINK
    assert entries["opt/tree/link"].target == "run.sh"
    assert entries["opt/tree/dangling"].target == "/no/such/target"
    tool = entries["usr/bin/tool"]
    assert (tool.kind, tool.mode) == (EntryKind.FILE, 0o755)


def test_missing_extra_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does-not-exist"):
        build(fake_kernel(tmp_path), tmp_path / "cache", files={"x": tmp_path / "does-not-exist"})


def test_special_host_file_is_a_config_error(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    with pytest.raises(ConfigError, match="fifo"):
        build(fake_kernel(tmp_path), tmp_path / "cache", files={"x": fifo})


@pytest.mark.parametrize(
    ("path", "what"),
    [
        ("init", "file"),  # /init is the rendered template, never a stray file
        ("bin/sh", "symlink"),  # a busybox applet
        ("etc/passwd", "file"),
        ("dev/console", "chardev"),
        ("proc", "dir"),  # a file where the harness needs a folder
    ],
)
def test_extra_file_clashing_with_the_harness_is_a_config_error(
    tmp_path: Path, path: str, what: str
) -> None:
    with pytest.raises(ConfigError, match=f"'{path}' clashes with the {what}"):
        build(fake_kernel(tmp_path), tmp_path / "cache", files={path: b"mine\n"})


def test_extra_file_below_a_harness_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'bin/sh' to be a folder"):
        build(fake_kernel(tmp_path), tmp_path / "cache", files={"bin/sh/x": b"x"})


@pytest.mark.parametrize("path", ["../escape", "a/../b", "/", "a//b"])
def test_unarchivable_extra_path_is_a_config_error(tmp_path: Path, path: str) -> None:
    with pytest.raises(ConfigError, match="initramfs files"):
        build(fake_kernel(tmp_path), tmp_path / "cache", files={path: b"x"})


def test_extra_folder_merges_into_a_harness_folder(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    image = build(fake_kernel(tmp_path), tmp_path / "cache", files={"etc": etc, "bin/extra": b""})
    entries = entries_of(image)
    assert entries["etc/hosts"].data == b"127.0.0.1 localhost\n"
    assert entries["etc/passwd"].data.startswith(b"root:")  # the harness's file stays
    assert entries["bin/extra"].kind is EntryKind.FILE
    assert entries["bin/sh"].kind is EntryKind.SYMLINK


# -- kernel config and compression ------------------------------------------------------------


def kernel_with_config(tmp_path: Path, text: str) -> Kernel:
    config = tmp_path / "config-6.1.0-test"
    config.write_text(text)
    return fake_kernel(tmp_path, config_path=config)


def test_compression_the_kernel_cannot_unpack_is_a_config_error(tmp_path: Path) -> None:
    kernel = kernel_with_config(
        tmp_path, "CONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\nCONFIG_RD_LZ4=y\n"
    )
    with pytest.raises(ConfigError, match="CONFIG_RD_ZSTD") as caught:
        build(kernel, tmp_path / "cache", compression="zstd")
    assert "'lz4'" in str(caught.value)  # the suggestion is a method this kernel has
    assert not (tmp_path / "cache" / "initramfs").exists() or not any(
        (tmp_path / "cache" / "initramfs").glob("*.zstd")
    )
    # The same kernel accepts what its config enables.
    assert build(kernel, tmp_path / "cache", compression="gzip").built


def test_kernel_without_config_accepts_any_compression(tmp_path: Path) -> None:
    assert build(fake_kernel(tmp_path), tmp_path / "cache", compression="lz4").built


def test_unknown_compression_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="brotli"):
        build(fake_kernel(tmp_path), tmp_path / "cache", compression="brotli")


# -- modules ----------------------------------------------------------------------------------


def test_modules_without_a_modules_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build(fake_kernel(tmp_path), tmp_path / "cache", modules=["sd_mod"])
    message = str(caught.value)
    assert "'fake'" in message and "sd_mod" in message and "modules" in message


def ko_payload(name: str, vermagic: bytes = VERMAGIC) -> bytes:
    return b"\x7fELF fake module " + name.encode() + vermagic + b"license=GPL\x00"


def make_tree(
    tmp_path: Path, dep: Mapping[str, Sequence[str]], vermagic: Mapping[str, bytes] | None = None
) -> Path:
    """A lib/modules/<release> folder: modules.dep as given (relpath -> dep relpaths, in
    depmod's order: the module to load first last) and a fake file per module."""
    modules_dir = tmp_path / "root" / "lib" / "modules" / RELEASE
    modules_dir.mkdir(parents=True)
    lines = [f"{module}: {' '.join(deps)}".rstrip() for module, deps in dep.items()]
    (modules_dir / "modules.dep").write_text("\n".join(lines) + "\n")
    for relpath in dep:
        name = relpath.rsplit("/", 1)[-1].split(".")[0]
        payload = ko_payload(name, (vermagic or {}).get(name, VERMAGIC))
        if relpath.endswith(".xz"):
            payload = lzma.compress(payload, format=lzma.FORMAT_XZ)
        path = modules_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    return modules_dir


# top needs mid and base, mid needs base; two of the files are xz-compressed. depmod writes
# each module's whole closure, the one to load first last.
TREE = {
    "kernel/drivers/test/top.ko.xz": ["kernel/drivers/test/mid.ko", "kernel/lib/base.ko.xz"],
    "kernel/drivers/test/mid.ko": ["kernel/lib/base.ko.xz"],
    "kernel/lib/base.ko.xz": [],
    "kernel/drivers/test/other.ko": ["kernel/lib/base.ko.xz"],
    "kernel/drivers/test/unused.ko": [],
}
DEPS = {"top": {"mid", "base"}, "mid": {"base"}, "base": set(), "other": {"base"}}


def test_modules_are_packed_in_load_order(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path, modules_dir=make_tree(tmp_path, TREE))
    image = build(kernel, tmp_path / "cache", modules=["top", "other"])
    names = [module.name for module in image.modules]
    assert sorted(names) == ["base", "mid", "other", "top"]
    for position, name in enumerate(names):
        assert DEPS[name] <= set(names[:position]), f"{name} before its deps: {names}"

    entries = entries_of(image)
    init = entries["init"].data.decode()
    assert init == image.init_script
    loaded = insmod_paths(init)
    assert loaded == [f"/{MODULES}/{m.relpath.removesuffix('.xz')}" for m in image.modules]
    loaded_names = [path.rsplit("/", 1)[-1].removesuffix(".ko") for path in loaded]
    assert loaded_names == names
    assert "mark MODULES-LOADED 4" in init.splitlines()
    for path in loaded:
        assert entries[path.lstrip("/")].kind is EntryKind.FILE
    assert not any("unused" in path for path in entries)


def test_compressed_modules_are_stored_decompressed_as_ko(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path, modules_dir=make_tree(tmp_path, TREE))
    image = build(kernel, tmp_path / "cache", modules=["top"])
    entries = entries_of(image)
    module_paths = sorted(p for p in entries if p.startswith(MODULES + "/"))
    stored = [p for p in module_paths if entries[p].kind is EntryKind.FILE]
    assert stored == [
        f"{MODULES}/kernel/drivers/test/mid.ko",
        f"{MODULES}/kernel/drivers/test/top.ko",
        f"{MODULES}/kernel/lib/base.ko",
    ]
    for path in stored:
        name = path.rsplit("/", 1)[-1].removesuffix(".ko")
        assert entries[path].data == ko_payload(name)
        assert entries[path].mode == 0o644
    assert not [p for p in entries if p.endswith((".xz", ".zst", ".gz"))]


def test_module_built_for_another_kernel_is_refused(tmp_path: Path) -> None:
    modules_dir = make_tree(tmp_path, TREE, vermagic={"mid": b"\x00vermagic=6.1.0-other SMP \x00"})
    kernel = fake_kernel(tmp_path, modules_dir=modules_dir)
    with pytest.raises(VermagicMismatchError, match=r"6\.1\.0-other"):
        build(kernel, tmp_path / "cache", modules=["top"])
    assert build(kernel, tmp_path / "cache", modules=["other"]).built


def test_unknown_module_is_a_config_error(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path, modules_dir=make_tree(tmp_path, TREE))
    with pytest.raises(ConfigError, match="tpo"):
        build(kernel, tmp_path / "cache", modules=["tpo"])
