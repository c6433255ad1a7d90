"""Bisecting initrd files: one kernel, an ordered list of images, verdicts from the console.

Five images of a user's own init (no markers): the first two print a working line, the last
three a broken one. The bisection must name the third with the fewest boots the math allows
(both ends, then halving: 2 + ceil(log2(4)) = 4) and a second run must boot nothing (the
verdicts are cached under the images' digests). Real boots are counted by a QEMU wrapper, from
outside the harness.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.bisect.search import max_verdicts
from harness.cli import main as cli
from harness.image import cpio
from harness.kernel.provision import Kernel

USER_INIT = """#!/bin/sh
{# bootharness: markers=off #}
mount -t proc proc /proc
echo bisect-image {{ number }} {{ state }}
poweroff -f
"""
STATES = ["works", "works", "broken", "broken", "broken"]
QEMU_WRAPPER = """#!/bin/sh
case " $* " in *" -kernel "*) echo boot >>"$BH_QEMU_LOG" ;; esac
exec {real} "$@"
"""


@pytest.fixture
def images(build_initramfs, tmp_path: Path) -> list[Path]:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "user-init.sh.j2").write_text(USER_INIT)
    paths = []
    for number, state in enumerate(STATES, start=1):
        image = build_initramfs(
            "user-init.sh.j2",
            variables={"number": number, "state": state},
            template_dirs=[templates],
        )
        paths.append(Path(shutil.copy(image.path, tmp_path / f"initrd-{number}.img")))
    return paths


@pytest.fixture
def boots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A QEMU wrapper that writes one line per real boot to the returned file."""
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    folder = tmp_path / "bin"
    folder.mkdir()
    wrapper = folder / "qemu-system-x86_64"
    wrapper.write_text(QEMU_WRAPPER.format(real=real))
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("BH_QEMU_LOG", str(tmp_path / "boots.log"))
    return tmp_path / "boots.log"


def count(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_bisect_over_five_initrds_finds_the_first_bad_and_reruns_from_the_cache(
    kernel: Kernel,
    images: list[Path],
    boots: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "bisect",
        "--initrds",
        ",".join(str(p) for p in images),
        "-k",
        kernel.name,
        "--expect",
        r"bisect-image \d+ works",
        "--fail",
        r"bisect-image \d+ broken",
        "--verdicts",
        str(tmp_path / "verdicts"),
        "--workdir",
        str(tmp_path / "runs"),
    ]
    code = cli.main(argv)
    output = capsys.readouterr().out
    assert code == 0, output
    assert f"first bad:   {images[2]}" in output
    assert f"last good:   {images[1]}" in output
    assert "TEST_FAIL -> bad" in output and "test fail:1: bisect-image 3 broken" in output
    minimal = max_verdicts(len(images))
    assert minimal == 4 and count(boots) == minimal, output

    again = cli.main(argv)
    output_again = capsys.readouterr().out
    assert again == 0, output_again
    assert count(boots) == minimal, "the second run booted"
    assert f"verdicts:    {minimal} ({minimal} from the cache)" in output_again


# The pytest oracle hands each candidate to the test as --initrd (the `initrd` fixture);
# this test only reads the image, so the bisection checks the oracle, not QEMU.
PYTEST_ORACLE_TEST = """
from harness.image import cpio

def test_image_is_good(initrd):
    paths = cpio.list_paths(initrd.read_bytes())
    assert "init" in paths
    assert b"broken" not in initrd.read_bytes()
"""


def test_pytest_oracle_gets_each_initrd_through_the_fixture(
    kernel: Kernel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    candidates = []
    for number, state in enumerate(["works", "works", "broken", "broken"], start=1):
        path = tmp_path / f"{number}-{state}.img"
        path.write_bytes(
            cpio.write_archive([cpio.Entry.file("init", f"#!/bin/sh\n# {state}\n".encode())])
        )
        candidates.append(path)
    (tmp_path / "test_oracle.py").write_text(PYTEST_ORACLE_TEST)
    catalogue = Path(__file__).resolve().parents[2] / "kernels.toml"
    monkeypatch.chdir(tmp_path)
    argv = [
        "--kernels",
        str(catalogue),
        "bisect",
        "--initrds",
        ",".join(str(p) for p in candidates),
        "-k",
        kernel.name,
        "--pytest",
        "test_oracle.py::test_image_is_good",
        "--verdicts",
        str(tmp_path / "verdicts"),
        "--workdir",
        str(tmp_path / "runs"),
    ]
    code = cli.main(argv)
    output = capsys.readouterr().out
    assert code == 0, output
    assert f"first bad:   {candidates[2]}" in output
    assert "TEST_FAIL -> bad" in output and "PASS -> good" in output
    assert cli.main(argv) == 0
    assert "verdicts:    4 (4 from the cache)" in capsys.readouterr().out


def test_bisect_step_judges_the_initrd_a_tree_builds(
    kernel: Kernel, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`git bisect run bootharness bisect-step -- boot --initrd out.img ...` in a generator's
    own repository: exit 0 for a good image, 1 for a bad one."""
    codes = []
    for image in (images[0], images[-1]):
        argv = [
            "bisect-step", "--verdicts", str(tmp_path / "verdicts"), "--",
            "boot", "-k", kernel.name, "--initrd", str(image),
            "--expect", r"bisect-image \d+ works", "--fail", r"bisect-image \d+ broken",
            "--workdir", str(tmp_path / f"runs-{image.stem}"),
        ]  # fmt: skip
        codes.append(cli.main(argv))
    output = capsys.readouterr().out
    assert codes == [0, 1], output
    assert "PASS -> good" in output and "TEST_FAIL -> bad" in output
