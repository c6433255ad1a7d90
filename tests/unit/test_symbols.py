"""harness.kernel.symbols: traces symbolised like scripts/decode_stacktrace.sh, against a
System.map, and against real ELF files with debug info built here by gcc (a stand-in vmlinux
and a relocatable module), so addr2line's answers are real."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.kernel.symbols import Symboliser, read_system_map, trace_block

SYSTEM_MAP = """\
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81001000 t do_one_initcall
ffffffff81001200 T sysrq_handle_crash
ffffffff81001220 T __sysrq_handle_key
ffffffff81001400 d some_data
ffffffff81002000 T _etext
"""

SOURCE = """\
static inline __attribute__((always_inline)) int inner(volatile int *p)
{
\treturn *p * 3;
}

__attribute__((noinline)) int crash(volatile int *p)
{
\treturn inner(p) + 1;
}

__attribute__((noinline)) int caller(volatile int *p)
{
\treturn crash(p) + 2;
}

int main(void)
{
\treturn caller((volatile int *)0);
}
"""

needs_gcc = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gcc", "objdump", "addr2line", "readelf")),
    reason="gcc and binutils are needed to build the ELF files",
)


def test_system_map_gives_addresses_and_turns_raw_addresses_into_symbols(tmp_path: Path) -> None:
    system_map = tmp_path / "System.map"
    system_map.write_text(SYSTEM_MAP)
    table = read_system_map(SYSTEM_MAP)
    assert [s.name for s in table.symbols][:2] == ["_text", "startup_64"]
    assert table.containing(0xFFFFFFFF81001230) is not None
    sym = Symboliser(system_map=system_map)
    trace = "\n".join(
        [
            "[    1.000000] RIP: 0010:sysrq_handle_crash+0x16/0x20",
            "[    1.000001] Call Trace:",
            "[    1.000002]  <TASK>",
            "[    1.000003]  __sysrq_handle_key+0x8a/0xf0",
            "[    1.000004]  [<ffffffff81001005>] 0xffffffff81001005",
            "[    1.000005]  lkdtm_do_action+0x15/0x30 [lkdtm]",
            "[    1.000006]  </TASK>",
        ]
    )
    decoded = sym.decode(trace).splitlines()
    assert decoded[0] == " RIP: 0010:sysrq_handle_crash+0x16/0x20 (0xffffffff81001216)"
    assert decoded[1] == " Call Trace:"
    assert decoded[3] == " __sysrq_handle_key+0x8a/0xf0 (0xffffffff810012aa)"
    assert decoded[4].endswith("-> do_one_initcall+0x5/0x200 (0xffffffff81001005)"), decoded[4]
    assert decoded[5] == " lkdtm_do_action+0x15/0x30 [lkdtm]"  # no module files: as printed


def test_nothing_to_add_is_an_empty_trace(tmp_path: Path) -> None:
    assert Symboliser().decode("[    1.0] Call Trace:\n") == ""
    system_map = tmp_path / "System.map"
    system_map.write_text(SYSTEM_MAP)
    assert Symboliser(system_map=system_map).decode("[    1.000000] hello\n") == ""


def test_trace_block_runs_from_the_fault_to_the_end_of_its_trace() -> None:
    text = (
        "boot\n[ 1.000000] BUG: oops\n[ 1.000001]  f+0x1/0x2\n"
        "[ 1.000002] ---[ end trace 0 ]---\nafter\n"
    )
    block = trace_block(text, text.index("[ 1.000000] BUG"))
    assert block.splitlines()[0].endswith("BUG: oops")
    assert block.splitlines()[-1].endswith("---[ end trace 0 ]---")


@needs_gcc
def test_debug_info_gives_file_line_and_inlined_frames(tmp_path: Path) -> None:
    (tmp_path / "crash.c").write_text(SOURCE)
    elf = tmp_path / "vmlinux"
    subprocess.run(
        ["gcc", "-O2", "-g", "-fno-pie", "-no-pie", "-o", str(elf), str(tmp_path / "crash.c")],
        check=True,
    )
    sym = Symboliser(vmlinux=elf)
    crash = sym.kernel_table().named("crash")
    assert crash is not None and crash.size > 0
    # The faulting frame: the load inside inner(), inlined into crash().
    decoded = [
        sym.decode(f"[    2.000000] RIP: 0010:crash+{offset:#x}/{crash.size:#x}")
        for offset in range(crash.size)
    ]
    inlined = [d for d in decoded if "inlined into crash" in d]
    assert inlined, decoded
    assert "inner at " in inlined[0] and "crash.c:3" in inlined[0], inlined[0]
    assert "crash.c:8" in inlined[0]
    # A return address in caller(): looked up one byte earlier, at the call.
    caller = sym.kernel_table().named("caller")
    assert caller is not None
    frames = [
        sym.decode(f"[    2.000001]  caller+{offset:#x}/{caller.size:#x}")
        for offset in range(1, caller.size)
    ]
    assert any("caller at " in f and "crash.c:13" in f for f in frames), frames


@needs_gcc
def test_module_frames_resolve_in_the_module_file(tmp_path: Path) -> None:
    (tmp_path / "crash.c").write_text(SOURCE)
    modules = tmp_path / "lib" / "modules" / "6.1.0" / "kernel" / "drivers"
    modules.mkdir(parents=True)
    module = modules / "crash_mod.ko"
    subprocess.run(
        ["gcc", "-O2", "-g", "-c", "-o", str(module), str(tmp_path / "crash.c")], check=True
    )
    sym = Symboliser(modules_dir=tmp_path / "lib" / "modules" / "6.1.0")
    found = sym.module("crash-mod")  # the kernel prints - or _ as the module was named
    assert found is not None and found[0] == module
    caller = found[1].named("caller")
    assert caller is not None
    frames = [
        sym.decode(f"[    3.000000]  caller+{offset:#x}/{caller.size:#x} [crash_mod]")
        for offset in range(1, caller.size)
    ]
    assert any("crash.c:13" in f for f in frames), frames


def test_debians_placeholder_system_map_gives_nothing(tmp_path: Path) -> None:
    placeholder = tmp_path / "System.map"
    placeholder.write_text(
        "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n"
    )
    assert read_system_map(placeholder.read_text()).symbols == []
    trace = "[    1.000000]  sysrq_handle_crash+0x16/0x20\n"
    assert Symboliser(system_map=placeholder).decode(trace) == ""
