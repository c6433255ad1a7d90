"""Benchmark: building an initramfs with the harness versus the classic shell pipeline.

Run from the repository: ``.venv/bin/python bench/initramfs.py [--repeat N]``.

The default kernel of kernels.toml is provisioned into the cache first (downloaded on a fresh
machine). The content is the same for every contender: busybox and its applet links, the
default kernel's storage modules (ata_piix, sd_mod, ahci, virtio_blk, ext4) with their
dependencies, the base layout and the /init. Each contender is timed ``--repeat`` times
(median reported), and each timer covers all the work of its contender:

  shell  a shell script doing by hand what the harness does: make the folders, copy busybox
         and link its applets, resolve the modules with ``modprobe --show-depends`` and copy
         (decompressing when needed) each one, write the /init (its text is given: a shell
         user writes it by hand), make the device nodes, then ``find . | cpio -o -H newc |
         gzip -9``
  cold   the harness building the image from scratch into a fresh cache folder (module
         resolution, template rendering and ``sh -n``, archive, gzip -9)
  warm   the harness asked again for the same image: a cache hit

The last two lines are the ratios harness time / shell time (both build the same content).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import cache, tools
from harness.image import cpio, initramfs
from harness.image.cpio import Entry, EntryKind
from harness.image.initramfs import InitramfsSpec
from harness.kernel import catalogue as config
from harness.kernel import provision as kernels

REPO = Path(__file__).resolve().parent.parent

STORAGE_MODULES = ("ata_piix", "sd_mod", "ahci", "virtio_blk", "ext4")
SHELL_PIPELINE = "find . | cpio -o -H newc --quiet | gzip -9"


def provision_default_kernel() -> kernels.Kernel:
    """The default kernel of the repository's kernels.toml, provisioned into the cache."""
    catalogue = config.load_catalogue(config.find_catalogue(start=REPO))
    entry = catalogue.get(catalogue.default)
    return kernels.provision(entry, cache.cache_root())


def extract(entries: list[Entry], root: Path) -> list[str]:
    """Write ``entries`` below ``root``; returns the paths that could not be created."""
    skipped: list[str] = []
    for entry in entries:
        target = root / entry.path
        if entry.kind is EntryKind.DIR:
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(entry.mode)
        elif entry.kind is EntryKind.FILE:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(entry.data)
            target.chmod(entry.mode)
        elif entry.kind is EntryKind.SYMLINK:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(entry.target)
        else:
            kind = stat.S_IFCHR if entry.kind is EntryKind.CHARDEV else stat.S_IFBLK
            try:
                os.mknod(target, kind | entry.mode, os.makedev(*entry.rdev))
            except PermissionError:
                skipped.append(entry.path)  # device nodes need root; they are a few bytes
    return skipped


def by_hand_script(kernel: kernels.Kernel, entries: list[Entry], init: str, work: Path) -> str:
    """The shell script of the ``shell`` contender: the whole build, by hand."""
    modules_dir = kernel.modules_dir
    root = modules_dir.parent.parent.parent
    init_file = work / "init.txt"
    init_file.write_text(init)
    dirs = " ".join(e.path for e in entries if e.kind is EntryKind.DIR)
    nodes = [e for e in entries if e.kind in (EntryKind.CHARDEV, EntryKind.BLOCKDEV)]
    mknods = "\n".join(
        f"mknod -m {e.mode:o} {e.path} {'c' if e.kind is EntryKind.CHARDEV else 'b'} "
        f"{e.rdev[0]} {e.rdev[1]} 2>/dev/null || true"
        for e in nodes
    )
    busybox = tools.require("busybox")
    # Small text files of the layout (passwd, group): written by hand, like the init.
    small = [e for e in entries if e.kind is EntryKind.FILE and e.path.startswith("etc/")]
    small_files = "\n".join(f"printf '%s' {shlex.quote(e.data.decode())} > {e.path}" for e in small)
    wanted = " ".join(STORAGE_MODULES)
    return f"""set -e
rm -rf tree && mkdir tree && cd tree
mkdir -p {dirs}
cp {busybox} bin/busybox
for applet in $(bin/busybox --list-full); do
  [ -e "$applet" ] || {{ mkdir -p "$(dirname "$applet")"; ln -s /bin/busybox "$applet"; }}
done
modprobe -C /dev/null -d {root} -S {modules_dir.name} -a --show-depends {wanted} |
while read -r verb path rest; do
  [ "$verb" = insmod ] || continue
  dest=.${{path#{root}}}
  mkdir -p "$(dirname "$dest")"
  case "$path" in
    *.xz) xz -dc "$path" > "${{dest%.xz}}" ;;
    *.zst) zstd -qdc "$path" > "${{dest%.zst}}" ;;
    *) cp "$path" "$dest" ;;
  esac
done
cp {init_file} init && chmod 755 init
{small_files}
{mknods}
{SHELL_PIPELINE}
"""


def median_time(action: Callable[[int], object], repeat: int) -> tuple[float, list[float]]:
    times: list[float] = []
    for attempt in range(repeat):
        start = time.perf_counter()
        action(attempt)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per contender (default 5)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for tool in ("cpio", "gzip", "find"):
        tools.require(tool)

    kernel = provision_default_kernel()
    spec = InitramfsSpec(modules=STORAGE_MODULES, compression="gzip")

    with tempfile.TemporaryDirectory(prefix="bootharness-bench-") as scratch:
        work = Path(scratch)
        reference = initramfs.build(kernel, spec, work / "reference-cache")
        entries = cpio.read_archive(reference.path.read_bytes())
        tree = work / "tree"
        tree.mkdir()
        skipped = extract(entries, tree)
        file_bytes = sum(len(e.data) for e in entries if e.kind is EntryKind.FILE)

        print("bootharness initramfs build benchmark")
        print(f"kernel:   {kernel.name} ({kernel.release})")
        print(
            f"content:  {len(entries)} entries, {file_bytes / 1e6:.1f} MB of files: busybox + "
            f"applet links, {len(reference.modules)} modules "
            f"({', '.join(STORAGE_MODULES)} + deps), /init"
        )
        if skipped:
            print(f"note:     not root, so the shell tree lacks {', '.join(skipped)}")
        print(f"measured: median of {args.repeat} runs, wall clock, gzip -9 everywhere")
        print(f"  shell  `{SHELL_PIPELINE}` in the extracted folder")
        print("  cold   harness build into a fresh cache folder")
        print("  warm   harness build of the same spec again (cache hit)")
        print()

        shell_out = work / "shell.cpio.gz"
        script = by_hand_script(kernel, entries, reference.init_script, work)

        def shell(_attempt: int) -> None:
            with shell_out.open("wb") as out:
                subprocess.run(["sh", "-c", script], cwd=work, stdout=out, check=True)

        def cold(attempt: int) -> None:
            image = initramfs.build(kernel, spec, work / f"cold-{attempt}")
            assert image.built, "a fresh cache folder must build"

        initramfs.build(kernel, spec, work / "warm")

        def warm(_attempt: int) -> None:
            image = initramfs.build(kernel, spec, work / "warm")
            assert not image.built, "the second build must be a cache hit"

        shell_time, shell_runs = median_time(shell, args.repeat)
        cold_time, cold_runs = median_time(cold, args.repeat)
        warm_time, warm_runs = median_time(warm, args.repeat)

        sizes = {
            "shell": shell_out.stat().st_size,
            "cold": reference.path.stat().st_size,
            "warm": reference.path.stat().st_size,
        }
        for name, median, runs in (
            ("shell", shell_time, shell_runs),
            ("cold", cold_time, cold_runs),
            ("warm", warm_time, warm_runs),
        ):
            spread = " ".join(f"{t:.3f}" for t in runs)
            print(f"{name:6} {median:7.3f} s  image {sizes[name]:>9} bytes  runs: {spread}")
        print()
        print(f"cold ratio: {cold_time / shell_time:.2f}")
        print(f"warm ratio: {warm_time / shell_time:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
