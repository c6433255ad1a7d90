"""Debian's own initramfs-tools images for a cached kernel, made without touching the host.

``mkinitramfs`` insists on ``/lib/modules/<release>`` and ``/boot/config-<release>`` of an
installed kernel. The harness's kernels live in its cache instead, so the build runs in a
mount namespace of its own (``unshare -m``) where a tmpfs covers ``/lib/modules`` and
``/boot``, the cached modules tree is bind-mounted at ``/lib/modules/<release>`` and the
kernel's config is copied to ``/boot``. Nothing of this is visible outside the namespace and
nothing is left behind. When the host has no ``/lib/modules`` at all (no kernel installed,
as in containers), a writable overlay over ``/lib``'s folder inside the namespace provides
the mount point.

The configuration comes from a folder of its own (``mkinitramfs -d``), never from the host's
``/etc/initramfs-tools``, so the same :class:`InitramfsToolsSpec` gives the same image on any
machine with the same packages. Images are cached under a digest of the kernel, the spec and
the versions of the Debian packages that go into them; a suite builds each once.

Needs root (mounts) and ``initramfs-tools-core``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness import cache, compression, tools
from harness.image import cpio
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError, InfraError

log = logging.getLogger(__name__)

_FORMAT = "initramfs-tools-1"
MODULES_POLICIES = ("list", "most", "dep", "netboot")
# What mkinitramfs calls its compressors (initramfs.conf COMPRESS=).
COMPRESSIONS = ("gzip", "zstd", "xz", "lz4", "lzma", "bzip2", "lzop")
# Packages whose files end up in the image: their versions key the cache.
PACKAGES = ("initramfs-tools-core", "busybox", "busybox-static", "klibc-utils", "udev", "kmod")

_NAMESPACE_SCRIPT = r"""
set -eu
mount --make-rprivate /
mount -t tmpfs tmpfs "$BH_WORK"
if [ ! -d /lib/modules ]; then
    # No kernel installed: give the folder holding /lib a writable overlay, here only.
    lib=$(readlink -f /lib)
    mkdir "$BH_WORK/upper" "$BH_WORK/work"
    mount -t overlay overlay -o "lowerdir=$lib,upperdir=$BH_WORK/upper,workdir=$BH_WORK/work" "$lib"
    mkdir /lib/modules
fi
mount -t tmpfs tmpfs /lib/modules
mkdir "/lib/modules/$BH_RELEASE"
mount --bind "$BH_MODULES" "/lib/modules/$BH_RELEASE"
[ -d /boot ] || { echo "this host has no /boot folder to cover" >&2; exit 3; }
mount -t tmpfs tmpfs /boot
cp "$BH_CONFIG" "/boot/config-$BH_RELEASE"
mkdir "$BH_WORK/tmp"
TMPDIR="$BH_WORK/tmp" exec mkinitramfs -d "$BH_CONFDIR" -o "$BH_OUTPUT" "$BH_RELEASE"
"""


@dataclass(frozen=True)
class InitramfsToolsSpec:
    """An initramfs-tools configuration (``initramfs.conf`` and its folder).

    ``modules`` is ``MODULES=``: ``list`` takes only ``drivers`` (and what they depend on),
    ``most`` every storage driver (the distribution default: a 30 MB image that unpacks for
    seconds under TCG), ``dep`` what the *build host's* root needs (host-dependent!).
    ``drivers`` are the lines of the ``modules`` file. ``hooks`` (build-time scripts,
    ``hooks/NAME``) and ``scripts`` (boot scripts, ``"init-top/NAME"``) are added to the
    configuration folder; ``settings`` are more ``initramfs.conf`` lines (``KEY=value``).
    """

    modules: str = "list"
    drivers: tuple[str, ...] = ()
    compression: str = "zstd"
    busybox: str = "auto"
    hooks: Mapping[str, str] = field(default_factory=dict)
    scripts: Mapping[str, str] = field(default_factory=dict)
    settings: Mapping[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Raises ConfigError for a value mkinitramfs would reject or misread."""
        if self.modules not in MODULES_POLICIES:
            raise ConfigError(
                f"initramfs-tools MODULES={self.modules!r}: use one of "
                f"{', '.join(MODULES_POLICIES)}"
            )
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"initramfs-tools COMPRESS={self.compression!r}: use one of "
                f"{', '.join(COMPRESSIONS)}"
            )
        for name in (*self.hooks, *self.scripts):
            parts = name.split("/")
            if any(part in ("", ".", "..") for part in parts) or len(parts) > 2:
                raise ConfigError(f"initramfs-tools hook or script name {name!r} is not valid")
        for key, value in self.settings.items():
            if not key.isidentifier() or "\n" in value:
                raise ConfigError(f"initramfs-tools setting {key}={value!r} is not valid")

    def conf(self) -> str:
        """The ``initramfs.conf`` text."""
        lines = [
            f"MODULES={self.modules}",
            f"BUSYBOX={self.busybox}",
            f"COMPRESS={self.compression}",
            "KEYMAP=n",
            "DEVICE=",
            "NFSROOT=auto",
            "RUNSIZE=10%",
            "FSTYPE=auto",
            *(f"{key}={value}" for key, value in sorted(self.settings.items())),
        ]
        return "\n".join(lines) + "\n"


def package_versions() -> list[str]:
    """``name version`` of each package of :data:`PACKAGES` that is installed."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version} ${db:Status-Abbrev}\\n", *PACKAGES],
        capture_output=True,
        text=True,
        check=False,
    )
    return sorted(
        " ".join(line.split()[:2]) for line in result.stdout.splitlines() if line.endswith("ii")
    )


def image_key(kernel: Kernel, spec: InitramfsToolsSpec) -> str:
    """The cache key: kernel identity, the whole spec, the packages' versions, the epoch."""
    parts = [
        _FORMAT,
        kernel.identity,
        spec.conf(),
        "\n".join(spec.drivers),
        *(f"hook {k}\n{v}" for k, v in sorted(spec.hooks.items())),
        *(f"script {k}\n{v}" for k, v in sorted(spec.scripts.items())),
        *package_versions(),
        str(cpio.source_date_epoch()),
    ]
    return cache.digest(parts)


def build(kernel: Kernel, spec: InitramfsToolsSpec, cache_root: Path) -> Path:
    """The initramfs-tools image of ``spec`` for ``kernel``, from the cache or built now.

    Raises:
        ConfigError: a bad spec, a kernel without modules folder or config, or a compression
            the kernel cannot unpack.
        MissingToolError: mkinitramfs or unshare is not installed.
        InfraError: not running as root, or mkinitramfs failed (with its output).
    """
    spec.check()
    if kernel.modules_dir is None or kernel.config_path is None:
        raise ConfigError(
            f"kernel {kernel.name!r}: mkinitramfs needs its modules folder and its config"
        )
    if spec.compression in compression.METHODS:
        compression.check_kernel_supports(spec.compression, kernel.config, kernel_name=kernel.name)
    key = image_key(kernel, spec)
    target = cache_root / "foreign" / f"initramfs-tools-{kernel.release}-{key[:24]}.img"
    built = cache.build_once(target, lambda partial: _run_mkinitramfs(kernel, spec, partial))
    log.info("initramfs-tools image %s (%s)", target, "built" if built else "cache hit")
    return target


def _run_mkinitramfs(kernel: Kernel, spec: InitramfsToolsSpec, output: Path) -> None:
    if os.geteuid() != 0:
        raise InfraError(
            "building an initramfs-tools image for a cached kernel needs root (a mount "
            "namespace with tmpfs and bind mounts); run as root or give a prebuilt image"
        )
    mkinitramfs = tools.require("mkinitramfs")
    unshare = tools.require("unshare")
    assert kernel.modules_dir is not None and kernel.config_path is not None
    with tempfile.TemporaryDirectory(prefix="bh-mkinitramfs-", dir=output.parent) as scratch:
        base = Path(scratch)
        confdir = base / "conf"
        _write_confdir(confdir, spec)
        work = base / "ns"
        work.mkdir()
        env = {
            "PATH": f"{Path(mkinitramfs).parent}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}",
            "BH_WORK": str(work),
            "BH_RELEASE": kernel.release,
            "BH_MODULES": str(kernel.modules_dir.resolve()),
            "BH_CONFIG": str(kernel.config_path.resolve()),
            "BH_CONFDIR": str(confdir),
            "BH_OUTPUT": str(output),
            "SOURCE_DATE_EPOCH": str(cpio.source_date_epoch()),
            "LC_ALL": "C",
        }
        log.info("running mkinitramfs for %s in a mount namespace", kernel.release)
        result = subprocess.run(
            [unshare, "-m", "sh", "-c", _NAMESPACE_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or not output.is_file():
            output_text = (result.stdout + result.stderr).strip()[-2000:]
            raise InfraError(
                f"mkinitramfs for kernel {kernel.name!r} failed (exit status "
                f"{result.returncode}):\n{output_text}"
            )
        if result.stderr.strip():
            log.debug("mkinitramfs said: %s", result.stderr.strip())


def _write_confdir(confdir: Path, spec: InitramfsToolsSpec) -> None:
    """A configuration folder like /etc/initramfs-tools, from the spec alone."""
    for folder in ("conf.d", "hooks", "scripts"):
        (confdir / folder).mkdir(parents=True)
    (confdir / "initramfs.conf").write_text(spec.conf())
    (confdir / "modules").write_text("".join(f"{line}\n" for line in spec.drivers))
    for name, text in spec.hooks.items():
        path = confdir / "hooks" / name
        path.write_text(text)
        path.chmod(0o755)
    for name, text in spec.scripts.items():
        path = confdir / "scripts" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
