"""HTML report speed in a real browser: a 500-result page against a 20-result page.

Both pages are rendered by the harness from the same kind of nightly results (three kernels,
two boot paths, two initramfs kinds, four controllers, some failures with excerpts and traces,
some kernel warnings), then opened in headless chromium driven over its DevTools pipe
(``--remote-debugging-pipe``: no port, no network). One sample is the time from asking the
browser to navigate to the page until the page has loaded and a frame has been laid out and
painted (``document.body.offsetHeight`` forces the layout, two animation frames the paint).
Rounds alternate the two pages so the machine's load weighs on both alike; the first round
is a warm-up and is dropped. Prints each median, the harness's own render time and
``ratio:`` (500-result time / 20-result time; the page grows 25x, the goal is well under that).
Run: .venv/bin/python bench/report_render.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.report import html
from harness.report.model import Results, TestRecord

KERNELS = ("debian-6.1-amd64", "debian-6.12-amd64", "src-6.1-min")
PATHS = ("pvh", "bios-grub")
KINDS = (("ours", "init.sh", ""), ("foreign", "", "dracut"))
CONTROLLERS = ("ahci", "nvme", "virtio-blk", "ide")
SETTLE = (
    "document.body.offsetHeight;"
    "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
)
WARNING = "WARNING: CPU: 0 PID: 1 at drivers/x.c:1 f+0x1/0x2"


def results(count: int) -> Results:
    """``count`` records spread over the matrix, every 23rd a failure, every 17th warned."""
    cells = [
        (kernel, path, kind, controller)
        for kernel in KERNELS
        for path in PATHS
        for kind in KINDS
        for controller in CONTROLLERS
    ]
    records = [record(n + 1, *cells[n % len(cells)]) for n in range(count)]
    return Results(records, "2026-11-29T02:00:00+00:00", "bench", 60.0)


def record(
    n: int, kernel: str, path: str, kind: tuple[str, str, str], controller: str
) -> TestRecord:
    initramfs, template, generator = kind
    params = f"{kernel}-{controller}-{path}-{generator or template}-{n}"
    failed = n % 23 == 0
    first = 0.15 if path == "pvh" else 2.6
    phases = {"first-byte": first, "INIT-START": first + 1.5}
    if not failed:
        phases |= {"PASS": first + 1.9, "shutdown": first + 2.0}
    return TestRecord(
        nodeid=f"tests/boot/test_nightly.py::test_boot_{n % 7}[{params}]",
        test=f"test_boot_{n % 7}",
        kernel=kernel,
        release="6.1.0-56-amd64",
        kernel_commit="3f2a9c1d7e4b" if kernel.startswith("src") else "",
        controller=controller,
        boot_path=path,
        initramfs=initramfs,
        template=template,
        generator=generator,
        initramfs_digest="9c8b7a6d5e4f" if generator else "",
        kernel_warnings=["WARNING: CPU: 0 PID: 1 at drivers/x.c:1 f+0x1/0x2"]
        if n % 17 == 0
        else [],
        params=params,
        outcome="KERNEL_FAULT" if failed else "PASS",
        message="kernel fault: panic" if failed else "",
        excerpt="[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs\n" * 8
        if failed
        else "",
        trace="mount_root+0x12/0x40 init/do_mounts.c:432\n" * 6 if failed else "",
        duration=2.5 + (n % 10) / 10,
        phases=phases,
        qemu_version="7.2.22",
        accelerator="tcg",
    )


class Browser:
    """Headless chromium over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: out)."""

    def __init__(self, profile: Path) -> None:
        chromium = shutil.which("chromium")
        if chromium is None:
            raise SystemExit("chromium is not installed: apt-get install chromium")
        commands_r, self._commands = os.pipe()
        self._events, events_w = os.pipe()

        def plumb() -> None:  # in the child: its fds 3 and 4 are the pipe ends
            os.dup2(commands_r, 3)
            os.dup2(events_w, 4)

        argv = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        # pass_fds names the fds after plumb() has put the pipe ends on them.
        self.process = subprocess.Popen(
            argv,
            pass_fds=(3, 4),
            preexec_fn=plumb,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_r)
        os.close(events_w)
        self._buffer = b""
        self._id = 0
        target = next(
            t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"
        )
        attached = self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        self.session = str(attached["sessionId"])
        self.call("Page.enable", session=self.session)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> int:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        return self._id

    def receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._events, 65536)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str = ""
    ) -> dict[str, Any]:
        wanted = self.send(method, params, session)
        while True:
            message = self.receive()
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def load(self, url: str) -> None:
        """Navigate and wait for the page's load event."""
        self.send("Page.navigate", {"url": url}, self.session)
        while self.receive().get("method") != "Page.loadEventFired":
            pass

    def render_time(self, url: str) -> float:
        """Seconds from navigating to ``url`` until it is loaded, laid out and painted."""
        self.load("about:blank")
        started = time.monotonic()
        self.load(url)
        self.call("Runtime.evaluate", {"expression": SETTLE, "awaitPromise": True}, self.session)
        return time.monotonic() - started

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.process.wait(timeout=10)
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._commands)
            os.close(self._events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-report-") as scratch:
        folder = Path(scratch)
        pages: dict[int, Path] = {}
        for count in (20, 500):
            started = time.monotonic()
            text = html.render(results(count), {})
            print(f"harness render {count}: {time.monotonic() - started:.3f} s, {len(text)} bytes")
            pages[count] = folder / f"page{count}.html"
            pages[count].write_text(text)
        browser = Browser(folder / "profile")
        samples: dict[int, list[float]] = {20: [], 500: []}
        try:
            for round_ in range(args.rounds + 1):
                for count, page in pages.items():
                    seconds = browser.render_time(page.as_uri())
                    if round_:  # the first round warms the browser up
                        samples[count].append(seconds)
        finally:
            browser.close()
    small, large = (statistics.median(samples[c]) for c in (20, 500))
    print(f"browser render 20: {small:.3f} s (median of {args.rounds})")
    print(f"browser render 500: {large:.3f} s (median of {args.rounds})")
    print(f"ratio: {large / small:.2f}")


if __name__ == "__main__":
    main()
