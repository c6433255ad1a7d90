"""The loader phase of a boot through firmware: from the firmware's hand-over to the kernel.

Between the firmware and the kernel runs a boot loader (GRUB) or the firmware's shell
(``startup.nsh`` starting the kernel's EFI stub). While it runs, :func:`run_loader`

- answers the prompts the boot path expects, once each (the EFI shell's countdown before
  startup.nsh, GRUB's menu when the entry is chosen by keys);
- ends the wait at the kernel's banner;
- stops at once when GRUB gives up: after a failed entry GRUB prints its errors, then
  "Press any key to continue..." and would boot the default again; without a menu it sits at
  ``grub>``; without its modules at ``grub rescue>``. That is a TEST_FAIL whose reason is
  GRUB's own first error line (``error: file `/boot/x' not found.``), not a timeout.

Error lines GRUB prints on every healthy EFI boot (no video mode without a display) are not
reasons (:data:`harness.storage.bootpaths.BENIGN_LOADER_ERRORS`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence

from harness.outcome import BootTimeout, Evidence, TestFailure
from harness.storage.bootpaths import BENIGN_LOADER_ERRORS, GRUB_FATAL, Prompt
from harness.vm.console import Console, ConsoleRecorder

log = logging.getLogger(__name__)

_BANNER = r"Linux version \S+"


def run_loader(
    console: Console,
    prompts: Sequence[Prompt],
    *,
    timeout: float,
    evidence: Callable[[str], Evidence],
) -> None:
    """Drive the loader phase until the kernel's banner.

    Raises:
        TestFailure: GRUB gave up (its first error line is the reason).
        KernelFault, BootTimeout: as :meth:`harness.vm.console.Console.expect`.
        ConsoleClosed: QEMU exited during the phase.
    """
    parts = [f"(?P<banner>{_BANNER})", f"(?P<fatal>{GRUB_FATAL.pattern})"]
    parts += [f"(?P<prompt{i}>{p.pattern.pattern})" for i, p in enumerate(prompts)]
    pattern = re.compile("|".join(parts))
    answered: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BootTimeout(
                f"no kernel banner within {timeout:.1f} s of the firmware's hand-over "
                f"(loader phase){_last_words(console.recorder)}",
                evidence("loader"),
            )
        match = console.expect(pattern, phase="loader", timeout=remaining)
        if match.group("banner"):
            return
        if match.group("fatal"):
            reason = failure_reason(console.recorder, match.group("fatal"))
            raise TestFailure(reason, evidence("loader"))
        for index, prompt in enumerate(prompts):
            if match.group(f"prompt{index}") and index not in answered:
                answered.add(index)
                log.info("answering %s with %r", prompt.what, prompt.keys)
                console.send(prompt.keys)


def loader_errors(recorder: ConsoleRecorder) -> list[str]:
    """The boot loader's error lines so far, benign ones left out."""
    return [
        m.detail
        for m in recorder.marks
        if m.name == "loader-error" and not any(b in m.detail for b in BENIGN_LOADER_ERRORS)
    ]


def failure_reason(recorder: ConsoleRecorder, seen: str) -> str:
    """Why GRUB gave up: its first error line, or which prompt it stopped at."""
    errors = loader_errors(recorder)
    entry = recorder.mark("loader-entry")
    where = f" booting entry {entry.detail!r}" if entry is not None else ""
    if errors:
        more = f" (then: {'; '.join(errors[1:3])})" if len(errors) > 1 else ""
        return f"GRUB failed{where}: error: {errors[0]}{more}"
    if "rescue" in seen:
        return "GRUB stopped at its rescue prompt (grub rescue>): it found no normal mode"
    if "grub>" in seen:
        return "GRUB stopped at its command prompt (grub>): no menu entry to boot"
    return f"GRUB gave up{where} ({seen.strip()})"


def _last_words(recorder: ConsoleRecorder) -> str:
    errors = loader_errors(recorder)
    return f"; the loader said: error: {errors[-1]}" if errors else ""
