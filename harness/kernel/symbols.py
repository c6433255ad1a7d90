"""Where a kernel crashed: stack traces symbolised against the kernel's own files.

The way the kernel's ``scripts/decode_stacktrace.sh`` does it, for each frame of a trace
(``RIP: 0010:func+0x15/0x20 [mod]``, `` ? func+0x5/0x10``, ``[<ffffffff81234567>]``):

* with a vmlinux (or module) that has debug info: the frame's address, then ``addr2line``
  for ``file:line`` and the functions inlined at that point;
* with only a System.map (Debian kernels, any kernel without debug info): the frame's
  absolute address from the symbol and offset, and raw addresses turned into
  ``symbol+offset``.

Return addresses point after the call, so every frame but the faulting one is looked up one
byte earlier, as the script does. A kernel booted through its PVH entry is not relocated
(KASLR happens in the decompressor, which PVH skips), so System.map addresses are the
runtime ones. A frame that cannot be resolved is shown as printed: symbolising never hides
a line of the trace.
"""

from __future__ import annotations

import bisect
import logging
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# The printk time stamp (and caller id) before a line, as in harness.vm.faults.
_PREFIX_RE = re.compile(r"^.*?\[ *\d+\.\d{6}\](?:\[ *[TC]\d+\])? ?")
_FRAME_RE = re.compile(
    r"(?P<unreliable>\? )?(?P<symbol>[A-Za-z_.$][\w.$]*)\+0x(?P<offset>[0-9a-f]+)"
    r"/0x(?P<size>[0-9a-f]+)(?: \[(?P<module>[\w-]+)[^\]]*\])?"
)
_ADDRESS_RE = re.compile(r"(?:\[<|\b0x)?(?P<address>ffffffff[0-9a-f]{8})(?:>\])?")
_RIP_RE = re.compile(r"\b(?:RIP|EIP|PC|pc) ?: ?(?:[0-9a-f]{4}:)?")
_END_RE = re.compile(r"---\[ end |</TASK>|^Kernel Offset:|^Rebooting in")
# Top-level folders of a kernel tree: file names from DWARF are shown from there on.
_TREE_DIRS = (
    "arch|block|certs|crypto|drivers|fs|include|init|io_uring|ipc|kernel|lib|mm|net|rust|"
    "samples|scripts|security|sound|tools|usr|virt"
)
_TREE_PATH_RE = re.compile(r"(?:\S*/)?((?:" + _TREE_DIRS + r")/[^\s:]+:\d+)")
MAX_TRACE_LINES = 80


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int
    size: int  # 0 when unknown
    section: str = ""


@dataclass
class SymbolTable:
    """Symbols of one object (vmlinux, System.map or a module), searchable both ways."""

    symbols: list[Symbol] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.symbols.sort(key=lambda s: s.address)
        self._addresses = [s.address for s in self.symbols]
        self._by_name: dict[str, list[Symbol]] = {}
        for symbol in self.symbols:
            self._by_name.setdefault(symbol.name, []).append(symbol)

    def named(self, name: str, size: int | None = None) -> Symbol | None:
        """The symbol called ``name``; among same-named static functions, the one whose size
        matches the trace's ``/0xsize`` (or the first)."""
        found = self._by_name.get(name, [])
        if size is not None:
            for symbol in found:
                if symbol.size == size:
                    return symbol
        return found[0] if found else None

    def containing(self, address: int) -> tuple[Symbol, int] | None:
        """The symbol an address falls in, and the offset into it."""
        index = bisect.bisect_right(self._addresses, address) - 1
        if index < 0:
            return None
        symbol = self.symbols[index]
        end = symbol.address + symbol.size if symbol.size else None
        if end is None and index + 1 < len(self.symbols):
            end = self.symbols[index + 1].address
        if end is not None and address >= end:
            return None
        return symbol, address - symbol.address


def read_system_map(text: str) -> SymbolTable:
    """Symbols of a System.map (``ffffffff81000000 T _text``); text symbols only.

    Debian's kernel packages ship a one-line placeholder ("The real System.map is in the
    linux-image-<version>-dbg package"), which gives an empty table.
    """
    symbols = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW" and len(parts[1]) == 1:
            try:
                symbols.append(Symbol(parts[2], int(parts[0], 16), 0))
            except ValueError:
                continue
    table = SymbolTable(symbols)
    _fill_sizes(table)
    return table


def _fill_sizes(table: SymbolTable) -> None:
    """System.map has no sizes: a symbol reaches the next one (padding included)."""
    sized = []
    for here, after in zip(table.symbols, [*table.symbols[1:], None], strict=False):
        size = after.address - here.address if after is not None else 0
        sized.append(Symbol(here.name, here.address, size))
    table.symbols[:] = sized
    table.__post_init__()


def read_objdump(text: str) -> SymbolTable:
    """Function symbols of ``objdump -t`` output, with their sections and sizes."""
    symbols = []
    for line in text.splitlines():
        # 0000000000000000 l     F .text	0000000000000020 lkdtm_WARNING
        match = re.match(r"([0-9a-f]{8,16}) [ \w!]{7} (\S+)\t([0-9a-f]+) +(\S+)$", line)
        if match is None:
            continue
        flags = line[len(match.group(1)) + 1 : len(match.group(1)) + 8]
        if "F" not in flags:
            continue
        symbols.append(
            Symbol(match.group(4), int(match.group(1), 16), int(match.group(3), 16), match.group(2))
        )
    return SymbolTable(symbols)


@dataclass(frozen=True)
class Frame:
    """One frame of a trace as printed, and what the kernel's files say about it."""

    text: str  # the line without its time stamp
    symbol: str = ""
    offset: int = 0
    size: int = 0
    module: str = ""
    address: int | None = None
    faulting: bool = False  # the RIP line: looked up exactly, not one byte earlier
    where: tuple[str, ...] = ()  # "func at file:line", innermost first (inlined frames)

    def render(self) -> str:
        text = self.text.strip()
        if self.address is not None and self.symbol and not self.module:
            text += f" ({self.address:#x})"
        if not self.where:
            return " " + text
        lines = [f" {text}  {self.where[0]}"]
        lines += [f"     inlined into {item}" for item in self.where[1:]]
        return "\n".join(lines)


class Symboliser:
    """Symbolises traces of one kernel: its System.map, vmlinux and modules folder."""

    def __init__(
        self,
        *,
        system_map: Path | None = None,
        vmlinux: Path | None = None,
        modules_dir: Path | None = None,
    ) -> None:
        self.system_map = system_map
        self.vmlinux = vmlinux
        self.modules_dir = modules_dir
        self._kernel_table: SymbolTable | None = None
        self._lock = threading.Lock()
        self._module_tables: dict[str, tuple[Path, SymbolTable] | None] = {}
        self._debug: dict[Path, bool] = {}

    @property
    def useful(self) -> bool:
        """Whether there is anything to symbolise with."""
        return any(p is not None for p in (self.system_map, self.vmlinux, self.modules_dir))

    def kernel_table(self) -> SymbolTable:
        """The kernel's symbols: from its vmlinux (with sizes), else its System.map."""
        with self._lock:
            if self._kernel_table is None:
                table = SymbolTable()
                if self.vmlinux is not None and self.vmlinux.is_file():
                    table = _cached_table(self.vmlinux, "objdump")
                system_map = self.system_map
                if not table.symbols and system_map is not None and system_map.is_file():
                    table = _cached_table(system_map, "system-map")
                self._kernel_table = table
            return self._kernel_table

    def preload(self) -> None:
        """Read the kernel's symbols in the background (while the guest boots), so a fault's
        trace is symbolised without delaying the verdict."""
        threading.Thread(target=self.kernel_table, name="symbols", daemon=True).start()

    def module(self, name: str) -> tuple[Path, SymbolTable] | None:
        if name not in self._module_tables:
            path = self._find_module(name)
            self._module_tables[name] = (path, _objdump(path)) if path is not None else None
        return self._module_tables[name]

    def _find_module(self, name: str) -> Path | None:
        if self.modules_dir is None or not self.modules_dir.is_dir():
            return None
        wanted = {f"{name}.ko", f"{name.replace('_', '-')}.ko", f"{name.replace('-', '_')}.ko"}
        for path in self.modules_dir.rglob("*.ko"):
            if path.name in wanted:
                return path
        return None

    def frames(self, lines: Sequence[str]) -> list[Frame]:
        """The frames of a trace's lines (lines without a frame are kept as text)."""
        frames = [self._frame(line) for line in lines]
        self._locate(frames)
        return frames

    def _frame(self, line: str) -> Frame:
        text = _PREFIX_RE.sub("", line.rstrip())
        faulting = bool(_RIP_RE.search(text))
        match = _FRAME_RE.search(text)
        if match is not None:
            symbol = match.group("symbol")
            offset, size = int(match.group("offset"), 16), int(match.group("size"), 16)
            module = match.group("module") or ""
            address = None
            if not module:
                found = self.kernel_table().named(symbol, size)
                if found is not None:
                    address = found.address + offset
            return Frame(text, symbol, offset, size, module, address, faulting)
        raw = _ADDRESS_RE.search(text)
        if raw is not None and (faulting or text.lstrip().startswith(("[<", "0x", "ffffffff"))):
            address = int(raw.group("address"), 16)
            hit = self.kernel_table().containing(address)
            if hit is not None:
                symbol, offset = hit
                text = f"{text.rstrip()} -> {symbol.name}+{offset:#x}/{symbol.size:#x}"
                return Frame(text, symbol.name, offset, symbol.size, "", address, faulting)
        return Frame(text)

    def _locate(self, frames: list[Frame]) -> None:
        """file:line (and inlined frames) for every frame, one addr2line per object file."""
        wanted: dict[Path, list[tuple[int, int, str]]] = {}
        for index, frame in enumerate(frames):
            if not frame.symbol:
                continue
            # Return addresses point after the call: look up the call itself.
            back = 0 if frame.faulting or frame.offset == 0 else 1
            if frame.module:
                found = self.module(frame.module)
                if found is None:
                    continue
                path, table = found
                symbol = table.named(frame.symbol, frame.size)
                if symbol is None:
                    continue
                wanted.setdefault(path, []).append(
                    (index, symbol.address + frame.offset - back, symbol.section)
                )
            elif frame.address is not None and self.vmlinux is not None:
                wanted.setdefault(self.vmlinux, []).append((index, frame.address - back, ""))
        for path, items in wanted.items():
            if not self._has_debug_info(path):
                continue
            by_section: dict[str, list[tuple[int, int]]] = {}
            for index, address, section in items:
                by_section.setdefault(section, []).append((index, address))
            for section, pairs in by_section.items():
                answers = _addr2line(path, [a for _, a in pairs], section)
                for (index, _), where in zip(pairs, answers, strict=True):
                    if where:
                        frames[index] = _with_where(frames[index], where)

    def _has_debug_info(self, path: Path) -> bool:
        if path not in self._debug:
            self._debug[path] = has_debug_info(path)
        return self._debug[path]

    def decode(self, text: str) -> str:
        """The symbolised form of a trace's text ("" when nothing could be added)."""
        lines = text.splitlines()
        if not lines or not self.useful:
            return ""
        frames = self.frames(lines)
        if not any(f.address is not None or f.where for f in frames):
            return ""
        return "\n".join(frame.render() for frame in frames)


def _with_where(frame: Frame, where: tuple[str, ...]) -> Frame:
    return Frame(
        frame.text,
        frame.symbol,
        frame.offset,
        frame.size,
        frame.module,
        frame.address,
        frame.faulting,
        where,
    )


def trace_block(text: str, offset: int, limit: int = MAX_TRACE_LINES) -> str:
    """The lines of a fault's report in ``text`` from the line at ``offset``: the fault line,
    registers and call trace, up to the end-of-trace line (at most ``limit`` lines)."""
    start = text.rfind("\n", 0, offset) + 1
    lines = []
    for line in text[start:].split("\n")[:limit]:
        lines.append(line.rstrip("\r"))
        if _END_RE.search(_PREFIX_RE.sub("", line)):
            break
    return "\n".join(lines)


def has_debug_info(path: Path) -> bool:
    """True when an ELF file carries DWARF line information (``.debug_line``)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return False
    result = subprocess.run(
        [readelf, "-S", "-W", str(path)], capture_output=True, text=True, check=False
    )
    return ".debug_line" in result.stdout or ".zdebug_line" in result.stdout


_TABLES: dict[tuple[str, str, int, int], SymbolTable] = {}
_TABLES_LOCK = threading.Lock()


def _cached_table(path: Path, kind: str) -> SymbolTable:
    """A symbol table read once per process and file version (VMs of one kernel share it)."""
    stat = path.stat()
    key = (kind, str(path), stat.st_size, stat.st_mtime_ns)
    with _TABLES_LOCK:
        found = _TABLES.get(key)
    if found is None:
        if kind == "objdump":
            found = _objdump(path)
        else:
            found = read_system_map(path.read_text(errors="replace"))
        with _TABLES_LOCK:
            _TABLES[key] = found
    return found


def _objdump(path: Path) -> SymbolTable:
    objdump = shutil.which("objdump")
    if objdump is None:
        log.info("objdump is not installed (binutils): no symbols from %s", path)
        return SymbolTable()
    result = subprocess.run([objdump, "-t", str(path)], capture_output=True, text=True, check=False)
    return read_objdump(result.stdout)


def _addr2line(path: Path, addresses: Iterable[int], section: str) -> list[tuple[str, ...]]:
    """``func at file:line`` for each address, innermost (inlined) first; () when unknown."""
    addr2line = shutil.which("addr2line")
    addresses = list(addresses)
    if addr2line is None or not addresses:
        return [() for _ in addresses]
    # One address per -a record: the "0x..." line starts each answer.
    argv = [addr2line, "-a", "-f", "-i", "-p", "-e", str(path)]
    if section:
        argv += ["-j", section]
    argv += [f"{address:#x}" for address in addresses]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    answers: list[list[str]] = []
    for line in result.stdout.splitlines():
        if re.match(r"0x[0-9a-f]+: ", line):
            answers.append([line.split(": ", 1)[1]])
        elif answers and line.strip().startswith("(inlined by)"):
            answers[-1].append(line.strip().removeprefix("(inlined by)").strip())
    out: list[tuple[str, ...]] = []
    for index in range(len(addresses)):
        items = answers[index] if index < len(answers) else []
        cleaned = tuple(_short(item) for item in items if "??" not in item.split(" at ")[-1])
        out.append(cleaned)
    return out


def _short(where: str) -> str:
    """``func at /build/linux/drivers/x.c:12`` -> ``func at drivers/x.c:12``."""
    return _TREE_PATH_RE.sub(lambda m: m.group(1), where)
