"""What a boot was, along every dimension of the test matrix, as the VM that booted knows it.

Reports (junit properties, the results JSON, the HTML page, merged nightly pages, history)
read a test's dimensions from :meth:`harness.vm.boot.Vm.dimensions`, never from the test's
fixtures or parameters: a test that boots an lsi disk through a parameter of its own still
reports ``controller="lsi"``. Each feature that changes what boots (a boot path, a prebuilt
initramfs, a disk layout, a kernel built from source) fills its field where the VM is made;
a field nobody filled keeps the default below, which is what the harness did before that
feature existed, so older results files load with the same values and their history matches.

Every name here is used as is by every report: the JSON key, the junit ``<property>`` name,
the page's ``data-`` attribute and the history's key.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from harness.storage import bootpaths

DEFAULT_BOOT_PATH = bootpaths.DEFAULT_BOOT_PATH  # the path boots took before there were others
OURS = "ours"  # an initramfs built by the harness from a template
FOREIGN = "foreign"  # a prebuilt image (a user's, or one a distribution's generator made)
SEPARATOR = "+"  # joins several values of one dimension: "ahci+nvme"

_PRINTK_TIME = re.compile(r"^\s*\[\s*\d+\.\d+\]\s*")


@dataclass(frozen=True)
class Dimensions:
    """One boot's place in the matrix; plain short strings, safe defaults.

    ``controller`` lists the controller models of the VM's disks, the boot disk's first, each
    once, joined by ``+`` ("" when the VM has no disk). ``layout`` is "" for a file system on
    the whole disk (or no disk), else e.g. ``mbr``, ``gpt``, ``lvm``, ``raid1``, ``luks``,
    joined by ``+`` when stacked. ``kernel_commit`` and ``kernel_config`` are set for kernels
    built from source (12 hex digits each). ``template`` names our own initramfs's template
    (without ``.j2``); ``initramfs_digest`` and ``generator`` describe a foreign image.
    ``kernel_warnings`` holds one console line per kernel WARNING, without its time stamp.
    """

    kernel: str = ""
    release: str = ""
    kernel_commit: str = ""
    kernel_config: str = ""
    controller: str = ""
    boot_path: str = DEFAULT_BOOT_PATH
    initramfs: str = OURS
    template: str = ""
    initramfs_digest: str = ""
    generator: str = ""
    layout: str = ""
    kernel_warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value (``kernel_warnings`` as a list, as JSON holds it)."""
        data = asdict(self)
        data["kernel_warnings"] = list(self.kernel_warnings)
        return data

    @property
    def initramfs_label(self) -> str:
        """``ours init.sh`` or ``foreign dracut``: the initramfs with what made it."""
        return initramfs_label(self.initramfs, self.template, self.generator)


NAMES: tuple[str, ...] = tuple(f.name for f in fields(Dimensions))
UNKNOWN = Dimensions()  # what a VM reports when nobody declared anything


def initramfs_label(initramfs: str, template: str, generator: str) -> str:
    """``ours init.sh`` or ``foreign dracut``: the initramfs with its template or generator."""
    detail = template if initramfs == OURS else generator
    return f"{initramfs} {detail}" if detail else initramfs


def joined(values: Any) -> str:
    """Several values of one dimension as one: each once, in order, joined by ``+``."""
    return SEPARATOR.join(dict.fromkeys(str(v) for v in values if v))


def warning_line(line: str) -> str:
    """A kernel warning's console line as reports show it: no printk time stamp, no padding."""
    return _PRINTK_TIME.sub("", line).strip()
