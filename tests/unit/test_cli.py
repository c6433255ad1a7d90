"""The ``bootharness`` command line, without booting anything."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import pytest

from harness.cli import main as cli
from harness.image import cpio
from harness.image.cpio import Entry
from tests.fakes import fake_bzimage

RELEASE = "6.1.0-test"


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    """kernels.toml with two local kernels (the second the default) and one Debian package."""
    fake_bzimage(tmp_path / "bzImage-a", "6.1.0-a")
    fake_bzimage(tmp_path / "bzImage-b", "6.1.0-b")
    path = tmp_path / "kernels.toml"
    path.write_text(
        'default = "local-b"\n'
        '[kernels."local-a"]\nvmlinuz = "bzImage-a"\ntags = ["mine"]\n'
        '[kernels."local-b"]\nvmlinuz = "bzImage-b"\ntags = ["mine", "fast"]\n'
        '[kernels."deb"]\ndebian_package = "linux-image-6.1.0-99-amd64-unsigned"\n'
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rows_by_name(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines()[1:]:
        cells = line.split()
        marked = cells[0] == "*"
        name = cells[1] if marked else cells[0]
        rows[name] = cells if marked else ["", *cells]
    return rows


def test_kernels_lists_every_kernel_with_the_default_marked(
    capsys: pytest.CaptureFixture[str], catalogue: Path, tmp_path: Path
) -> None:
    code, out, _ = run(
        capsys, "--kernels", str(catalogue), "--cache", str(tmp_path / "c"), "kernels"
    )
    assert code == 0
    rows = rows_by_name(out)
    assert list(rows) == ["local-a", "local-b", "deb"]
    assert rows["local-b"][0] == "*"
    assert rows["local-a"][0] == rows["deb"][0] == ""
    # name, source, release, fetched, tags
    assert rows["local-a"][1:] == ["local-a", str(tmp_path / "bzImage-a"), "6.1.0-a", "yes", "mine"]
    assert rows["local-b"][3:] == ["6.1.0-b", "yes", "mine,fast"]
    assert rows["deb"][1:] == ["deb", "linux-image-6.1.0-99-amd64-unsigned", "-", "no", "-"]


def test_global_options_work_after_the_subcommand_too(
    capsys: pytest.CaptureFixture[str], catalogue: Path, tmp_path: Path
) -> None:
    code, out, _ = run(
        capsys, "kernels", "--kernels", str(catalogue), "--cache", str(tmp_path / "c")
    )
    assert code == 0
    assert list(rows_by_name(out)) == ["local-a", "local-b", "deb"]


def test_bad_kernels_toml_is_a_usage_error_naming_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "kernels.toml"
    bad.write_text('[kernels."x"]\nvmlinuz = "missing-bzImage"\n')
    code, out, err = run(capsys, "--kernels", str(bad), "kernels")
    assert code == 5
    assert out == ""
    assert err.startswith("bootharness: ")
    assert str(bad) in err
    assert "missing-bzImage" in err


def test_fetch_provisions_the_selected_kernels(
    capsys: pytest.CaptureFixture[str], catalogue: Path, tmp_path: Path
) -> None:
    base = ["--kernels", str(catalogue), "--cache", str(tmp_path / "c"), "fetch"]
    code, out, _ = run(capsys, *base)
    assert code == 0
    lines = out.splitlines()[1:]
    assert [line.split() for line in lines] == [["local-b", "6.1.0-b", str(tmp_path / "bzImage-b")]]
    code, out, _ = run(capsys, *base, "local-a")
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [["local-a", "6.1.0-a"]]


def test_fetch_of_an_unknown_kernel_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], catalogue: Path, tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "--kernels", str(catalogue), "--cache", str(tmp_path / "c"), "fetch", "local-z"
    )
    assert code == 5
    assert "'local-z'" in err


SAMPLE = [
    Entry.dir("bin"),
    Entry.file("bin/hello", b"hello world\n", mode=0o755),
    Entry.symlink("bin/sh", "busybox"),
    Entry.dir("dev", mode=0o700),
    Entry.chardev("dev/console", 5, 1, mode=0o600),
    Entry.blockdev("dev/vda", 254, 0, mode=0o660),
]


def test_initramfs_ls_prints_entries_like_ls_l(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    image = tmp_path / "plain.cpio"
    image.write_bytes(cpio.write_archive(SAMPLE))
    code, out, _ = run(capsys, "initramfs", "ls", str(image))
    assert code == 0
    lines = [line.split(None, 1) for line in out.splitlines()]
    assert [(mode, rest.split()) for mode, rest in lines] == [
        ("drwxr-xr-x", ["0", "bin"]),
        ("-rwxr-xr-x", ["12", "bin/hello"]),
        ("lrwxrwxrwx", ["7", "bin/sh", "->", "busybox"]),
        ("drwx------", ["0", "dev"]),
        ("crw-------", ["5,", "1", "dev/console"]),
        ("brw-rw----", ["254,", "0", "dev/vda"]),
    ]


def test_initramfs_ls_reads_compressed_and_concatenated_images(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    microcode = "kernel/x86/microcode/GenuineIntel.bin"
    early = cpio.write_archive(
        [Entry.dir("kernel"), Entry.dir("kernel/x86"), Entry.dir("kernel/x86/microcode"),
         Entry.file(microcode, b"uc")]
    )  # fmt: skip
    image = tmp_path / "initrd.img"
    image.write_bytes(early + gzip.compress(cpio.write_archive(SAMPLE)))
    code, out, _ = run(capsys, "initramfs", "ls", "--paths", str(image))
    assert code == 0
    assert out.splitlines() == [
        "kernel",
        "kernel/x86",
        "kernel/x86/microcode",
        microcode,
        *(entry.path for entry in SAMPLE),
    ]

    gz = tmp_path / "initrd.gz"
    gz.write_bytes(gzip.compress(cpio.write_archive(SAMPLE)))
    code, out, _ = run(capsys, "initramfs", "ls", str(gz))
    assert code == 0
    assert out.splitlines()[1].split() == ["-rwxr-xr-x", "12", "bin/hello"]


def test_initramfs_ls_of_garbage_names_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"this is not an initramfs")
    code, out, err = run(capsys, "initramfs", "ls", str(junk))
    assert code == 5
    assert out == ""
    assert str(junk) in err
    code, _, err = run(capsys, "initramfs", "ls", str(tmp_path / "absent.img"))
    assert code == 5
    assert "absent.img" in err


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox-static")
def test_initramfs_build_makes_a_listable_image_and_caches_it(
    capsys: pytest.CaptureFixture[str], catalogue: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "payload.txt"
    extra.write_text("payload\n")
    output = tmp_path / "out.cpio"
    argv = [
        "--kernels", str(catalogue), "--cache", str(tmp_path / "c"),
        "initramfs", "build", "-k", "local-a", "-c", "none",
        "--file", f"etc/payload.txt={extra}", "--var", "root_wait=3", "-o", str(output),
    ]  # fmt: skip
    code, out, _ = run(capsys, *argv)
    assert code == 0
    summary = dict(line.split(":", 1) for line in out.splitlines())
    image = Path(summary["image"].strip())
    assert image.is_relative_to(tmp_path / "c")
    assert summary["modules"].strip() == "(none)"
    assert summary["cache"].strip() == "built"
    assert Path(summary["copied"].strip()) == output
    assert output.read_bytes() == image.read_bytes()
    assert output.read_bytes()[:6] == b"070701"  # -c none: plain cpio

    code, out, _ = run(capsys, "initramfs", "ls", "--paths", str(output))
    assert code == 0
    paths = out.splitlines()
    assert {"init", "bin/busybox", "etc/payload.txt", "dev/console"} <= set(paths)

    code, out, _ = run(capsys, *argv)
    assert code == 0
    again = dict(line.split(":", 1) for line in out.splitlines())
    assert again["cache"].strip() == "hit"
    assert Path(again["image"].strip()) == image


def test_initramfs_build_with_a_missing_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], catalogue: Path, tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "--kernels", str(catalogue), "--cache", str(tmp_path / "c"),
        "initramfs", "build", "--file", f"x={tmp_path / 'nope'}",
    )  # fmt: skip
    assert code == 5
    assert "nope" in err


def test_a_tag_naming_several_kernels_is_refused_for_one_kernel_commands(
    capsys: pytest.CaptureFixture[str], catalogue: Path, tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "--kernels", str(catalogue), "--cache", str(tmp_path / "c"),
        "initramfs", "build", "-k", "mine",
    )  # fmt: skip
    assert code == 5
    assert "local-a" in err and "local-b" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        [],
        ["kernels", "--no-such-option"],
        ["initramfs"],
        ["initramfs", "build", "-c", "bzip2"],
        ["boot", "--accel", "hvf"],
        ["boot", "--timeout-multiplier", "0"],
        ["boot", "--boot-timeout", "soon"],
    ],
)
def test_usage_errors_exit_5(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 5
    assert out == ""
    assert "usage: bootharness" in err


def test_a_malformed_var_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], catalogue: Path, tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "--kernels", str(catalogue), "--cache", str(tmp_path / "c"),
        "initramfs", "build", "--var", "no-equals-sign",
    )  # fmt: skip
    assert code == 5
    assert "--var 'no-equals-sign'" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "initramfs" in out and "boot" in out


def test_boot_shell_without_a_terminal_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run(capsys, "--kernels", str(tmp_path / "absent.toml"), "boot", "--shell")
    assert code == 5
    assert "--shell needs a terminal" in err


def test_build_without_a_source_kernel_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], catalogue: Path, tmp_path: Path
) -> None:
    code, _, err = run(capsys, "--kernels", str(catalogue), "--cache", str(tmp_path / "c"), "build")
    assert code == 5
    assert "no kernel built from source" in err and 'linux_source = "linux-source-6.1"' in err


def test_kernels_lists_a_source_kernel_unbuilt_without_building_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tree = tmp_path / "linux"
    tree.mkdir()
    (tree / "Makefile").write_text("all:\n")
    (tree / "Kconfig").write_text("\n")
    path = tmp_path / "kernels.toml"
    path.write_text('[kernels."mine"]\ntree = "linux"\nconfig = "defconfig"\n')
    code, out, _ = run(capsys, "--kernels", str(path), "--cache", str(tmp_path / "c"), "kernels")
    assert code == 0
    assert rows_by_name(out)["mine"][1:] == [
        "mine",
        "build:",
        str(tree),
        "(defconfig)",
        "-",
        "no",
        "-",
    ]
    assert not (tmp_path / "c" / "kernels" / "source" / "build").exists()
