"""Distribution roots and the distribution's own initramfs, built from real packages, cached.

A *root* is a Debian folder made by ``mmdebstrap`` from Debian's packages (minbase plus the
packages asked for: systemd, udev, lvm2, mdadm, cryptsetup, initramfs-tools, dracut...), set up
to be booted by a test: a host name, ``root`` with an empty password (the serial getty lets it
in without a password prompt), an fstab naming the root by label. It is cached by a digest of
its inputs (suite, variant, packages, mirror, the set-up script, a snapshot label); the package
versions that went in (``dpkg-query``) and the mirror's ``InRelease`` date are recorded with
it, and :attr:`DistroRoot.identity` (inputs + versions) keys everything made from the root.

A *distro initramfs* is made by the root's own generator, ``mkinitramfs`` (initramfs-tools)
or ``dracut``, for a kernel of the cache: no kernel is installed anywhere. The generator runs
inside the root, in a private mount namespace (``unshare -m``) whose root is an overlay of the
cached folder, with the kernel's modules tree and config bind-mounted where the generator
looks for them, so neither the host nor the cached root is ever written. Images are cached by
the root's identity, the kernel's identity and the generator's configuration.

Both need root privileges on the host (``chroot``, mounts); mmdebstrap itself runs in its
``unshare`` mode. Nothing here boots a VM.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import cache, tools
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError, InfraError

log = logging.getLogger(__name__)

SUITE = "bookworm"
VARIANT = "minbase"
MIRROR = "http://deb.debian.org/debian"
HOSTNAME = "bootharness"
ROOT_LABEL = "root"  # the label the root's fstab (and every layout's file system) uses

# What a booted system needs, and what each generator and storage layer needs in the root.
SYSTEM_PACKAGES = ("systemd-sysv", "udev", "kmod", "e2fsprogs", "procps")
STORAGE_PACKAGES = ("lvm2", "mdadm", "cryptsetup")
GENERATOR_PACKAGES: Mapping[str, tuple[str, ...]] = {
    # busybox and zstd are initramfs-tools' Recommends (BUSYBOX=auto, COMPRESS=zstd).
    "initramfs-tools": ("initramfs-tools", "cryptsetup-initramfs", "busybox", "zstd"),
    # dracut-core is the generator itself; Debian's "dracut" package would remove
    # initramfs-tools, dracut-core lives next to it.
    "dracut": ("dracut-core",),
}
GENERATORS = tuple(GENERATOR_PACKAGES)
DEFAULT_PACKAGES = tuple(
    dict.fromkeys(
        (
            *SYSTEM_PACKAGES,
            *STORAGE_PACKAGES,
            *(p for g in GENERATORS for p in GENERATOR_PACKAGES[g]),
        )
    )
)

_ROOT_FORMAT = "1"
_INITRAMFS_FORMAT = "1"
_MANIFEST = "manifest.json"
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_HOSTNAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

# Run by mmdebstrap as a --customize-hook with the new root in $1 and our output folder in $2.
# The apt lists are still there (mmdebstrap removes them afterwards): their InRelease date
# says which state of the mirror the packages came from.
SETUP_SCRIPT = r"""set -eu
root=$1 out=$2 hostname=$3 label=$4
echo "$hostname" >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$hostname" >"$root/etc/hosts"
printf 'LABEL=%s\t/\text4\tdefaults\t0\t1\n' "$label" >"$root/etc/fstab"
chroot "$root" passwd -d root >/dev/null
# Without dbus and logind this unit starts gettys on tty1-6: seconds of a TCG boot for nothing.
ln -sf /dev/null "$root/etc/systemd/system/getty-static.service"
if [ -f "$root/etc/cryptsetup-initramfs/conf-hook" ]; then
	# Put cryptsetup in every initramfs-tools image, also without an /etc/crypttab entry: the
	# layouts name the encrypted root on the kernel command line (cryptopts=).
	echo CRYPTSETUP=y >>"$root/etc/cryptsetup-initramfs/conf-hook"
fi
chroot "$root" dpkg-query -W -f='${Package}\t${Version}\n' >"$out/packages.tsv"
cat "$root"/var/lib/apt/lists/*InRelease 2>/dev/null |
	sed -n 's/^Date: //p' >"$out/mirror-date" || :
"""

# Runs the generator inside the root without writing the root or the host: a private mount
# namespace (``unshare -m --propagation private``), an overlay whose upper layer is a tmpfs,
# the kernel's modules tree bound read-only at /lib/modules/<release> (mkdir on the overlay,
# never on the cached root) and its config in /boot, the output folder bound at /out.
GENERATE_SCRIPT = r"""set -eu
root=$1 modules=$2 config=$3 release=$4 out=$5 conf=$6 work=$7
shift 7
mount -t tmpfs -o mode=0755 bootharness-gen "$work"
mkdir "$work/upper" "$work/work" "$work/merged"
mount -t overlay overlay -o "lowerdir=$root,upperdir=$work/upper,workdir=$work/work" "$work/merged"
m=$work/merged
mount -t proc proc "$m/proc"
mount --rbind /sys "$m/sys"
mount --rbind /dev "$m/dev"
mount -t tmpfs tmpfs "$m/tmp"
mount -t tmpfs tmpfs "$m/run"
mount -t tmpfs tmpfs "$m/var/tmp"
mkdir -p "$m/lib/modules/$release" "$m/out"
mount --bind -o ro "$modules" "$m/lib/modules/$release"
cp "$config" "$m/boot/config-$release"
cp -R "$conf/." "$m/"
mount --bind "$out" "$m/out"
exec chroot "$m" "$@"
"""


@dataclass(frozen=True)
class RootSpec:
    """What a distro root is made of. Every field goes into its cache key.

    ``snapshot`` labels the state of the mirror the root should come from: the first build
    with a label fetches whatever the mirror has and the label then keeps naming that root;
    give a new label (e.g. a date) to build from the mirror again.

    Raises (from :meth:`validate`): ConfigError for a bad package or host name.
    """

    suite: str = SUITE
    variant: str = VARIANT
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    mirror: str = MIRROR
    hostname: str = HOSTNAME
    snapshot: str = ""

    def validate(self) -> None:
        """Raises ConfigError naming every bad package name, or a bad host name."""
        bad = [p for p in self.packages if not _PACKAGE.match(p)]
        if bad:
            raise ConfigError(f"distro root: bad package name(s) {', '.join(map(repr, bad))}")
        if not _HOSTNAME.match(self.hostname):
            raise ConfigError(f"distro root: bad host name {self.hostname!r}")
        if not re.match(r"^[a-z]+$", self.suite) or not re.match(r"^[a-z]+$", self.variant):
            raise ConfigError(f"distro root: bad suite {self.suite!r} or variant {self.variant!r}")

    @property
    def key(self) -> str:
        """The digest naming this root in the cache."""
        parts = [_ROOT_FORMAT, self.suite, self.variant, self.mirror, self.hostname]
        parts += [self.snapshot, SETUP_SCRIPT, ROOT_LABEL, *sorted(set(self.packages))]
        return cache.digest(parts)

    def with_packages(self, *packages: str) -> RootSpec:
        """This spec with ``packages`` added (kept once, in order)."""
        merged = tuple(dict.fromkeys((*self.packages, *packages)))
        return RootSpec(self.suite, self.variant, merged, self.mirror, self.hostname, self.snapshot)


@dataclass(frozen=True)
class DistroRoot:
    """A built root folder (read-only by convention: it is the cache's) and what went in."""

    spec: RootSpec
    path: Path
    packages: Mapping[str, str]  # package -> version, as dpkg-query lists them
    mirror_date: str  # the Date of the mirror's InRelease the packages came from
    seconds: float  # how long the build took (0 on a cache hit)
    built: bool

    @property
    def identity(self) -> str:
        """A digest of the inputs and of every package version: keys what is made from it."""
        versions = [f"{name}={version}" for name, version in sorted(self.packages.items())]
        return cache.digest([self.spec.key, self.mirror_date, *versions])

    def version(self, package: str) -> str:
        """The version of ``package`` in the root, or "" when it is not installed."""
        return self.packages.get(package, "")


class DistroBuildError(InfraError):
    """A root or initramfs build failed; ``step`` and ``package`` say where (may be "")."""

    def __init__(
        self, message: str, *, step: str = "", package: str = "", log_tail: str = ""
    ) -> None:
        super().__init__(message)
        self.step = step
        self.package = package
        self.log_tail = log_tail


def require_root_privileges(what: str) -> None:
    """Raises ConfigError when the harness does not run as root (chroot and mounts need it)."""
    if os.geteuid() != 0:
        raise ConfigError(f"{what} needs root privileges (chroot and mounts); run as root")


def root_dir(spec: RootSpec, cache_root: Path) -> Path:
    """Where the root of ``spec`` lives in the cache (built or not)."""
    return cache_root / "distro" / "roots" / spec.key[:32]


def is_built(spec: RootSpec, cache_root: Path) -> bool:
    """True when the root of ``spec`` is in the cache: :func:`build_root` builds nothing."""
    return (root_dir(spec, cache_root) / _MANIFEST).is_file()


def build_root(spec: RootSpec, cache_root: Path, *, progress: bool | None = None) -> DistroRoot:
    """The root of ``spec``, built with mmdebstrap unless it is in the cache.

    Safe across processes (one builds, the others wait). ``progress`` echoes mmdebstrap's
    steps on stderr (default: when stderr is a terminal).

    Raises:
        ConfigError: a bad spec, or not running as root.
        DistroBuildError: mmdebstrap failed; the message names the step it was in and the
            package, when apt or dpkg named one.
        MissingToolError: mmdebstrap is not installed.
    """
    spec.validate()
    target = root_dir(spec, cache_root)
    started = time.monotonic()
    if progress is None:
        progress = sys.stderr.isatty()

    def build(partial: Path) -> None:
        require_root_privileges("building a distro root")
        partial.mkdir()
        _mmdebstrap(spec, partial, progress)

    built = cache.build_once(target, build)
    seconds = time.monotonic() - started if built else 0.0
    if built:
        log.info("built distro root %s in %.1f s", target, seconds)
    meta = json.loads((target / _MANIFEST).read_text())
    return DistroRoot(
        spec=spec,
        path=target / "root",
        packages=dict(meta["packages"]),
        mirror_date=str(meta["mirror_date"]),
        seconds=seconds,
        built=built,
    )


def _mmdebstrap(spec: RootSpec, partial: Path, progress: bool) -> None:
    mmdebstrap = tools.require("mmdebstrap")
    script = partial / "setup.sh"
    script.write_text(SETUP_SCRIPT)
    # mmdebstrap runs the hook with sh, the new root in "$1".
    quoted = [shlex.quote(w) for w in (str(partial), spec.hostname, ROOT_LABEL)]
    hook = f'sh {shlex.quote(str(script))} "$1" {" ".join(quoted)}'
    argv = [
        mmdebstrap,
        "--mode=unshare",
        f"--variant={spec.variant}",
        # No fsync per file: the folder is renamed into the cache only when complete.
        "--dpkgopt=force-unsafe-io",
        f"--include={','.join(spec.packages)}",
        f"--customize-hook={hook}",
        spec.suite,
        str(partial / "root"),
        spec.mirror,
    ]
    lines = _run_streaming(argv, progress=progress, prefix="root")
    if lines.returncode != 0:
        raise _build_error(lines.output, "mmdebstrap", lines.returncode)
    packages = _parse_packages((partial / "packages.tsv").read_text())
    date_file = partial / "mirror-date"
    mirror_date = date_file.read_text().strip().splitlines() if date_file.exists() else []
    meta = {
        "spec": {
            "suite": spec.suite,
            "variant": spec.variant,
            "packages": list(spec.packages),
            "mirror": spec.mirror,
            "hostname": spec.hostname,
            "snapshot": spec.snapshot,
        },
        "packages": packages,
        "mirror_date": mirror_date[0] if mirror_date else "",
    }
    (partial / _MANIFEST).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    for name in ("packages.tsv", "mirror-date", "setup.sh"):
        (partial / name).unlink(missing_ok=True)


def _parse_packages(text: str) -> dict[str, str]:
    packages: dict[str, str] = {}
    for line in text.splitlines():
        name, _, version = line.partition("\t")
        if name:
            packages[name] = version
    return packages


@dataclass(frozen=True)
class _Run:
    returncode: int
    output: list[str]


def _run_streaming(argv: Sequence[str], *, progress: bool, prefix: str) -> _Run:
    """Run ``argv``, collecting its merged output; with ``progress``, echo its step lines."""
    log.debug("running %s", argv)
    output: list[str] = []
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            output.append(line)
            if progress and re.match(r"^[IWE]: |^dracut: \*\*\*|^mkinitramfs", line):
                print(f"bootharness: {prefix}: {line}", file=sys.stderr, flush=True)
        returncode = process.wait()
    return _Run(returncode, output)


# mmdebstrap announces each step with an "I: <step>..." line; apt and dpkg name the package.
_STEP = re.compile(r"^I: (?P<step>[a-z].*?)(?:\.\.\.)?$")
_PACKAGE_ERRORS = (
    re.compile(r"E: Unable to locate package (?P<package>\S+)"),
    re.compile(r"E: Package '(?P<package>[^']+)' has no installation candidate"),
    re.compile(r"dpkg: error processing (?:package|archive) (?P<package>\S+)"),
    re.compile(r"(?P<package>\S+) : Depends: "),
)


def _build_error(output: Sequence[str], tool: str, returncode: int) -> DistroBuildError:
    """A build error naming the last step announced and the package apt or dpkg blamed."""
    step = ""
    package = ""
    errors: list[str] = []
    for line in output:
        if match := _STEP.match(line):
            step = match.group("step")
        for pattern in _PACKAGE_ERRORS:
            if not package and (found := pattern.search(line)):
                package = found.group("package")
        if line.startswith(("E: ", "dpkg: error")) or " : Depends: " in line:
            errors.append(line)
    where = f" while {step}" if step else ""
    which = f" (package {package})" if package else ""
    detail = "; ".join(errors[:5]) or (output[-1] if output else "no output")
    tail = "\n".join(output[-30:])
    return DistroBuildError(
        f"{tool} failed{where}{which}: exit {returncode}: {detail}",
        step=step,
        package=package,
        log_tail=tail,
    )


# --- the distribution's own initramfs ---------------------------------------------------


@dataclass(frozen=True)
class GeneratorConfig:
    """How the distribution's generator makes the image. Every field goes into the cache key.

    initramfs-tools: ``modules`` is ``MODULES=`` (``most``, ``list`` or ``netboot``; ``dep``
    looks at the hardware of the machine running the generator, which is not the target's,
    and is refused), ``drivers`` go to ``/etc/initramfs-tools/modules``, ``compression`` is
    ``COMPRESS=`` (default zstd), ``settings`` are more ``initramfs.conf`` lines.
    dracut: ``dracut_modules`` are added (``--add``), ``omit`` left out, ``drivers`` added
    (``--add-drivers``), ``compression`` is ``compress=`` (default gzip), ``hostonly`` is off
    (a host-only image would describe the generating machine), ``settings`` are more
    ``dracut.conf`` lines. ``files`` are extra files put in the root before generating
    (hooks, configuration), by path inside the root.
    """

    generator: str
    modules: str = "most"
    drivers: tuple[str, ...] = ()
    compression: str = ""
    dracut_modules: tuple[str, ...] = ("lvm", "mdraid", "crypt")
    omit: tuple[str, ...] = ()
    settings: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, bytes] = field(default_factory=dict)

    def validate(self) -> None:
        """Raises ConfigError for an unknown generator, MODULES value or a bad file path."""
        if self.generator not in GENERATORS:
            raise ConfigError(
                f"unknown initramfs generator {self.generator!r}; "
                f"use one of {', '.join(GENERATORS)}"
            )
        if self.generator == "initramfs-tools" and self.modules not in ("most", "list", "netboot"):
            raise ConfigError(
                f"initramfs-tools MODULES={self.modules!r}: use most, list or netboot; 'dep' "
                "looks at the machine that runs the generator, not at the target"
            )
        for name in (*self.drivers, *self.dracut_modules, *self.omit, self.compression):
            if name and not re.match(r"^[A-Za-z0-9_.+-]+$", name):
                raise ConfigError(f"{self.generator}: bad name {name!r} in the configuration")
        for key in self.settings:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ConfigError(f"{self.generator}: bad setting name {key!r}")
        for path in self.files:
            parts = Path(path.lstrip("/")).parts
            if not parts or ".." in parts:
                raise ConfigError(f"{self.generator}: file path {path!r} must stay inside the root")

    def config_files(self) -> dict[str, bytes]:
        """The files that configure the generator, by path inside the root."""
        files: dict[str, bytes] = {}
        if self.generator == "initramfs-tools":
            lines = [f"MODULES={self.modules}"]
            if self.compression:
                lines.append(f"COMPRESS={self.compression}")
            lines += [f"{k}={shlex.quote(v)}" for k, v in sorted(self.settings.items())]
            files["etc/initramfs-tools/conf.d/bootharness"] = "\n".join(lines).encode() + b"\n"
            if self.drivers:
                files["etc/initramfs-tools/modules"] = "\n".join(self.drivers).encode() + b"\n"
        else:
            lines = ['hostonly="no"']
            if self.dracut_modules:
                lines.append(f'add_dracutmodules+=" {" ".join(self.dracut_modules)} "')
            if self.omit:
                lines.append(f'omit_dracutmodules+=" {" ".join(self.omit)} "')
            if self.drivers:
                lines.append(f'add_drivers+=" {" ".join(self.drivers)} "')
            if self.compression:
                lines.append(f'compress="{self.compression}"')
            lines += [f'{k}="{v}"' for k, v in sorted(self.settings.items())]
            files["etc/dracut.conf.d/90-bootharness.conf"] = "\n".join(lines).encode() + b"\n"
        for path, data in self.files.items():
            files[path.lstrip("/")] = data
        return files

    def command(self, release: str, output: str) -> list[str]:
        """The generator's command line inside the root."""
        if self.generator == "initramfs-tools":
            return ["mkinitramfs", "-o", output, release]
        return ["dracut", "--force", "--no-hostonly", "--kver", release, output]

    @property
    def key(self) -> str:
        parts: list[str | bytes] = [_INITRAMFS_FORMAT, GENERATE_SCRIPT, *self.command("R", "O")]
        for path, data in sorted(self.config_files().items()):
            parts += [path, data]
        return cache.digest(parts)


def generator_config(generator: str, **options: object) -> GeneratorConfig:
    """A validated :class:`GeneratorConfig` (``options`` are its fields).

    Raises:
        ConfigError: see :meth:`GeneratorConfig.validate`, or an unknown option.
    """
    try:
        config = GeneratorConfig(generator, **options)  # type: ignore[arg-type]
    except TypeError as error:
        raise ConfigError(f"initramfs generator options: {error}") from None
    config.validate()
    return config


@dataclass(frozen=True)
class DistroInitramfs:
    """An image made by the distribution's generator for one kernel."""

    path: Path
    generator: str
    digest: str  # sha256 of the image file
    seconds: float  # generation time (0 on a cache hit)
    built: bool


def generate(
    root: DistroRoot,
    kernel: Kernel,
    config: GeneratorConfig,
    cache_root: Path,
    *,
    progress: bool | None = None,
) -> DistroInitramfs:
    """The image ``config``'s generator makes inside ``root`` for ``kernel``; cached.

    Raises:
        ConfigError: a bad configuration, a kernel without a modules tree or config, a root
            without the generator, or not running as root.
        DistroBuildError: the generator failed (its output's last lines are in the error).
        MissingToolError: unshare or chroot is not installed.
    """
    config.validate()
    if kernel.modules_dir is None or not kernel.modules_dir.is_dir():
        raise ConfigError(f"kernel {kernel.name} has no modules tree: a distro initramfs needs one")
    if kernel.config_path is None:
        raise ConfigError(f"kernel {kernel.name} has no config file: the generators read it")
    needed = "initramfs-tools-core" if config.generator == "initramfs-tools" else "dracut-core"
    if not root.version(needed):
        raise ConfigError(
            f"the distro root has no {needed}: add {GENERATOR_PACKAGES[config.generator][0]} "
            "to its packages"
        )
    key = cache.digest([root.identity, kernel.identity, config.key])
    target = cache_root / "distro" / "initramfs" / f"{config.generator}-{key[:32]}.img"
    if progress is None:
        progress = sys.stderr.isatty()
    started = time.monotonic()

    def build(partial: Path) -> None:
        require_root_privileges(f"running {config.generator} in a distro root")
        _generate_into(root, kernel, config, partial, progress)

    built = cache.build_once(target, build)
    seconds = time.monotonic() - started if built else 0.0
    if built:
        log.info("%s made %s in %.1f s", config.generator, target, seconds)
    return DistroInitramfs(
        path=target,
        generator=config.generator,
        digest=cache.file_digest(target),
        seconds=seconds,
        built=built,
    )


def _generate_into(
    root: DistroRoot, kernel: Kernel, config: GeneratorConfig, partial: Path, progress: bool
) -> None:
    assert kernel.modules_dir is not None and kernel.config_path is not None
    scratch = partial.parent
    conf = scratch / "conf"
    for path, data in config.config_files().items():
        target = conf / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    conf.mkdir(exist_ok=True)
    work = scratch / "work"
    work.mkdir()
    out = scratch / "out"
    out.mkdir()
    argv = [
        tools.require("unshare"),
        "--mount",
        "--propagation",
        "private",
        "--",
        tools.require("sh"),
        "-c",
        GENERATE_SCRIPT,
        "bootharness-generate",
        str(root.path),
        str(kernel.modules_dir.resolve()),
        str(kernel.config_path.resolve()),
        kernel.release,
        str(out),
        str(conf),
        str(work),
        *config.command(kernel.release, f"/out/{partial.name}"),
    ]
    tools.require("chroot")
    result = _run_streaming(argv, progress=progress, prefix=config.generator)
    produced = out / partial.name
    if result.returncode != 0 or not produced.is_file():
        error = _build_error(result.output, config.generator, result.returncode)
        raise DistroBuildError(
            f"{config.generator} for {kernel.release} failed (exit {result.returncode}): "
            + "; ".join(result.output[-5:]),
            step=config.generator,
            package=error.package,
            log_tail=error.log_tail,
        )
    os.replace(produced, partial)
    os.chmod(partial, 0o444)


__all__ = (
    "DEFAULT_PACKAGES",
    "GENERATORS",
    "DistroBuildError",
    "DistroInitramfs",
    "DistroRoot",
    "GeneratorConfig",
    "RootSpec",
    "build_root",
    "generate",
    "generator_config",
    "is_built",
)
