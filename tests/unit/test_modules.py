"""Tests of harness.kernel.modules: resolving module names to files in load order, and vermagic.

Most tests build synthetic module trees in ``tmp_path`` (fake ``.ko`` files that only hold a
``vermagic=`` string, hand-written ``modules.dep`` and companions).

The tests marked "real kernel" run against a provisioned kernel's modules folder: the default
kernel of kernels.toml (provisioned into the cache on first use), or another one given as::

    BOOTHARNESS_TEST_MODULES_DIR=/path/to/lib/modules/<release> pytest tests/unit/test_modules.py

The folder's name must be the kernel release. When the folder sits in a ``ROOT/lib/modules/``
tree and kmod's ``modprobe`` is installed, the order is also compared with
``modprobe --show-depends``.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

from harness.kernel.modules import (
    ModuleFile,
    ModuleIndex,
    UnknownModuleError,
    VermagicMismatchError,
    modprobe_name,
    read_vermagic,
)
from harness.outcome import ConfigError, MissingToolError

RELEASE = "6.1.0-test"
VERMAGIC = b"\x00vermagic=6.1.0-test SMP mod_unload \x00"
MODULES_DIR_ENV = "BOOTHARNESS_TEST_MODULES_DIR"


# -- building synthetic trees ---------------------------------------------------------------


def ko(name: str, suffix: str = ".ko") -> str:
    """The relpath of a synthetic module, as modules.dep would write it."""
    return f"kernel/drivers/test/{name}{suffix}"


def write_ko(path: Path, vermagic: bytes = VERMAGIC) -> None:
    """A fake module: bytes around a .modinfo-style vermagic string, compressed by suffix."""
    payload = b"\x7fELF fake module" + vermagic + b"license=GPL\x00"
    if path.name.endswith(".xz"):
        data = lzma.compress(payload, format=lzma.FORMAT_XZ)
    elif path.name.endswith(".gz"):
        data = gzip.compress(payload)
    elif path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            pytest.skip("the zstd program is needed to build a .ko.zst fixture")
        data = subprocess.run(
            [zstd, "-q", "-c", "-"], input=payload, capture_output=True, check=True
        ).stdout
    else:
        data = payload
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_tree(
    tmp_path: Path,
    dep: Mapping[str, Sequence[str]],
    *,
    builtin: Iterable[str] = (),
    softdep: str | None = None,
    alias: str | None = None,
    builtin_modinfo: bytes | None = None,
    release: str = RELEASE,
) -> Path:
    """A ROOT/lib/modules/<release> folder with modules.dep (relpath -> dep relpaths, written
    in the given order), optional companions, and a fake file for every module named."""
    modules_dir = tmp_path / "root" / "lib" / "modules" / release
    modules_dir.mkdir(parents=True)
    lines = [f"{module}: {' '.join(deps)}".rstrip() for module, deps in dep.items()]
    (modules_dir / "modules.dep").write_text("\n".join(lines) + "\n")
    for relpath in {*dep, *(d for deps in dep.values() for d in deps)}:
        write_ko(modules_dir / relpath)
    if builtin:
        (modules_dir / "modules.builtin").write_text("".join(f"{b}\n" for b in builtin))
    if softdep is not None:
        (modules_dir / "modules.softdep").write_text(softdep)
    if alias is not None:
        (modules_dir / "modules.alias").write_text(alias)
    if builtin_modinfo is not None:
        (modules_dir / "modules.builtin.modinfo").write_bytes(builtin_modinfo)
    return modules_dir


def load(modules_dir: Path, release: str = RELEASE) -> ModuleIndex:
    return ModuleIndex.load(modules_dir, release)


def names(modules: Sequence[ModuleFile]) -> list[str]:
    return [m.name for m in modules]


def closure(graph: Mapping[str, Sequence[str]], roots: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def assert_load_order(result: Sequence[str], graph: Mapping[str, Sequence[str]]) -> None:
    """Each module once, and after every module it depends on."""
    assert len(result) == len(set(result)), f"duplicates in {result}"
    position = {name: i for i, name in enumerate(result)}
    for name in result:
        for dep in graph.get(name, ()):
            assert position[dep] < position[name], f"{dep} must load before {name}: {result}"


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("sd-mod", "sd_mod"),
        ("sd_mod", "sd_mod"),
        ("crc-t10dif", "crc_t10dif"),
        ("a-b_c-d", "a_b_c_d"),
    ],
)
def test_modprobe_name_treats_dash_and_underscore_alike(given: str, canonical: str) -> None:
    assert modprobe_name(given) == canonical
    assert modprobe_name(canonical) == canonical


# -- resolution order --------------------------------------------------------------------------


# Only direct dependencies are written, unlike depmod's closure, so the index must follow
# deps of deps itself. A diamond (top -> left/right -> base) and a chain hanging off it.
DIAMOND = {
    "top": ["left", "right", "tail0"],
    "left": ["base"],
    "right": ["base", "tail2"],
    "tail0": ["tail1"],
    "tail1": ["tail2"],
    "tail2": ["base"],
    "base": [],
    "unrelated": ["base"],
}


def diamond_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path, {ko(m): [ko(d) for d in deps] for m, deps in DIAMOND.items()})


def test_resolve_follows_dependencies_of_dependencies(tmp_path: Path) -> None:
    index = load(diamond_tree(tmp_path))
    result = names(index.resolve(["top"]))
    assert set(result) == closure(DIAMOND, ["top"])
    assert "unrelated" not in result
    assert_load_order(result, DIAMOND)
    assert result[-1] == "top"


def test_resolve_returns_absolute_paths_and_relpaths_from_modules_dep(tmp_path: Path) -> None:
    modules_dir = diamond_tree(tmp_path)
    for module in load(modules_dir).resolve(["top"]):
        assert module.relpath == ko(module.name)
        assert module.path == modules_dir / module.relpath
        assert module.path.is_absolute() and module.path.is_file()


def test_resolve_of_several_names_lists_shared_dependencies_once(tmp_path: Path) -> None:
    index = load(diamond_tree(tmp_path))
    result = names(index.resolve(["unrelated", "top", "left", "top"]))
    assert set(result) == closure(DIAMOND, ["unrelated", "top"])
    assert_load_order(result, DIAMOND)


def test_resolve_is_deterministic_across_indexes(tmp_path: Path) -> None:
    modules_dir = diamond_tree(tmp_path)
    first = load(modules_dir).resolve(["top", "unrelated"])
    again = load(modules_dir)
    assert again.resolve(["top", "unrelated"]) == first
    assert again.resolve(["top", "unrelated"]) == first


def test_resolve_walks_dependencies_in_reverse_like_modprobe(tmp_path: Path) -> None:
    # depmod writes the module that must load first last; modprobe loads c, then b.
    modules_dir = make_tree(tmp_path, {ko("a"): [ko("b"), ko("c")], ko("b"): [], ko("c"): []})
    assert names(load(modules_dir).resolve(["a"])) == ["c", "b", "a"]


def test_resolve_handles_a_very_deep_chain(tmp_path: Path) -> None:
    # Deeper than Python's default recursion limit: the walk must not recurse.
    depth = 3000
    chain = {f"m{i}": [f"m{i + 1}"] if i + 1 < depth else [] for i in range(depth)}
    modules_dir = make_tree(tmp_path, {ko(m): [ko(d) for d in deps] for m, deps in chain.items()})
    result = names(load(modules_dir).resolve(["m0"]))
    assert result == [f"m{i}" for i in reversed(range(depth))]


def test_dependency_without_its_own_line_is_a_leaf(tmp_path: Path) -> None:
    modules_dir = make_tree(tmp_path, {ko("a"): [ko("leaf", ".ko.xz")]})
    result = load(modules_dir).resolve(["a"])
    assert [(m.name, m.relpath) for m in result] == [("leaf", ko("leaf", ".ko.xz")), ("a", ko("a"))]


def test_compressed_module_names_drop_the_whole_suffix(tmp_path: Path) -> None:
    modules_dir = make_tree(
        tmp_path,
        {ko("x", ".ko.xz"): [ko("z", ".ko.zst")], ko("z", ".ko.zst"): [ko("g", ".ko.gz")]},
    )
    index = load(modules_dir)
    assert {"x", "z", "g"} == index.names()
    assert [m.relpath for m in index.resolve(["x"])] == [
        ko("g", ".ko.gz"),
        ko("z", ".ko.zst"),
        ko("x", ".ko.xz"),
    ]


# -- dash and underscore ----------------------------------------------------------------------


def test_dash_and_underscore_are_the_same_name(tmp_path: Path) -> None:
    modules_dir = make_tree(
        tmp_path, {ko("sd-mod"): [ko("scsi_mod")], ko("scsi_mod"): [ko("crc-t10dif")]}
    )
    index = load(modules_dir)
    assert index.names() == {"sd_mod", "scsi_mod", "crc_t10dif"}
    by_dash = index.resolve(["sd-mod"])
    assert index.resolve(["sd_mod"]) == by_dash
    assert index.resolve(["sd-mod", "sd_mod", "scsi-mod"]) == by_dash
    assert [m.relpath for m in by_dash] == [ko("crc-t10dif"), ko("scsi_mod"), ko("sd-mod")]
    assert names(by_dash) == ["crc_t10dif", "scsi_mod", "sd_mod"]


# -- built-in modules -------------------------------------------------------------------------


def builtin_tree(tmp_path: Path) -> Path:
    return make_tree(
        tmp_path,
        {ko("needs_lib"): [], ko("plain"): []},
        builtin=["kernel/lib/zlib-inflate.ko", "kernel/fs/ext2/ext2.ko"],
    )


def test_builtin_module_resolves_to_nothing(tmp_path: Path) -> None:
    index = load(builtin_tree(tmp_path))
    assert index.resolve(["ext2"]) == []
    assert index.resolve(["zlib_inflate", "zlib-inflate"]) == []
    assert names(index.resolve(["ext2", "plain"])) == ["plain"]


def test_is_builtin(tmp_path: Path) -> None:
    index = load(builtin_tree(tmp_path))
    assert index.is_builtin("zlib-inflate")
    assert index.is_builtin("zlib_inflate")
    assert not index.is_builtin("plain")
    assert not index.is_builtin("nonexistent")
    assert "ext2" not in index.names()


def test_modules_builtin_is_optional(tmp_path: Path) -> None:
    index = load(make_tree(tmp_path, {ko("a"): []}))
    assert not index.is_builtin("a")
    assert names(index.resolve(["a"])) == ["a"]


# -- softdeps and aliases ------------------------------------------------------------------------

SOFT_DEP = {
    ko("fs"): [ko("journal"), ko("cache")],
    ko("journal"): [],
    ko("cache"): [],
    ko("crc_generic"): [ko("crc_common")],
    ko("crc_common"): [],
    ko("crc_fast"): [ko("crc_common")],
    ko("cipher-generic"): [],
    ko("post_only"): [],
}
SOFTDEP_FILE = """\
# Soft dependencies extracted from modules themselves.
softdep fs pre: crypto-crc missing-thing zlib_inflate
softdep fs pre: crypto_cipher post: post_only
softdep journal pre: crypto-crc
softdep cache cipher-generic
softdep
"""
ALIAS_FILE = """\
# Aliases extracted from modules themselves.
alias crypto-crc crc_fast
alias cpu:type:x86,ven*fam*mod*:feature:*0094* crc_fast
alias crypto-crc crc_generic
alias crc crc_fast
alias crypto-cipher cipher_generic
alias crypto-cipher* fs
alias pci:v00008086d*sv*sd*bc*sc*i* journal
"""


def softdep_tree(tmp_path: Path) -> Path:
    return make_tree(
        tmp_path,
        SOFT_DEP,
        softdep=SOFTDEP_FILE,
        alias=ALIAS_FILE,
        builtin=["kernel/lib/zlib_inflate.ko"],
    )


def test_pre_softdeps_load_before_the_module_with_their_own_dependencies(tmp_path: Path) -> None:
    index = load(softdep_tree(tmp_path))
    result = names(index.resolve(["fs"]))
    # crypto-crc names crc_fast (a CPU-feature module, listed first) and crc_generic: the one
    # that loads on any CPU is picked, once, although fs and journal both ask for it.
    assert result.count("crc_generic") == 1
    assert "crc_fast" not in result
    graph = {
        "fs": ["journal", "cache", "crc_generic", "cipher_generic"],
        "journal": ["crc_generic"],
        "crc_generic": ["crc_common"],
    }
    assert set(result) == closure(graph, ["fs"])
    assert_load_order(result, graph)


def test_softdep_of_a_dependency_is_honoured(tmp_path: Path) -> None:
    index = load(softdep_tree(tmp_path))
    assert names(index.resolve(["journal"])) == ["crc_common", "crc_generic", "journal"]


def test_softdep_words_outside_pre_are_ignored(tmp_path: Path) -> None:
    index = load(softdep_tree(tmp_path))
    # "softdep cache cipher-generic" has no "pre:", and post_only is a post: softdep.
    assert names(index.resolve(["cache"])) == ["cache"]
    assert "post_only" not in names(index.resolve(["fs"]))


def test_unknown_or_builtin_softdep_is_skipped_with_a_debug_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = load(softdep_tree(tmp_path))
    with caplog.at_level(logging.DEBUG, logger="harness.kernel.modules"):
        result = names(index.resolve(["fs"]))
    assert result[-1] == "fs"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any("missing_thing" in message for message in skipped)
    assert any("zlib_inflate" in message and "built in" in message for message in skipped)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_exact_alias_can_be_requested_and_wildcards_are_not_names(tmp_path: Path) -> None:
    index = load(softdep_tree(tmp_path))
    assert names(index.resolve(["crypto_cipher"])) == ["cipher_generic"]
    # Only one candidate: picked even though it depends on a CPU feature.
    assert names(index.resolve(["crc"])) == ["crc_common", "crc_fast"]
    with pytest.raises(UnknownModuleError):
        index.resolve(["crypto-cipher-anything"])
    with pytest.raises(UnknownModuleError):
        index.resolve(["pci:v00008086d00001234sv0sd0bc0sc0i0"])


def test_module_name_wins_over_an_alias_of_the_same_name(tmp_path: Path) -> None:
    modules_dir = make_tree(tmp_path, {ko("crc"): [], ko("other"): []}, alias="alias crc other\n")
    assert names(load(modules_dir).resolve(["crc"])) == ["crc"]


def test_alias_wins_over_a_builtin_module_name_like_modprobe(tmp_path: Path) -> None:
    # Debian 6.1: lib/crc32 is built in, while "crc32" is also the crypto modules' alias.
    modules_dir = make_tree(
        tmp_path,
        {ko("crc32_generic"): []},
        builtin=["kernel/lib/crc32.ko"],
        alias="alias crc32 crc32_generic\n",
    )
    assert names(load(modules_dir).resolve(["crc32"])) == ["crc32_generic"]


def test_alias_a_builtin_module_provides_needs_nothing_loaded(tmp_path: Path) -> None:
    modules_dir = make_tree(
        tmp_path,
        {ko("sha256_fast"): [], ko("user"): []},
        alias="alias sha256 sha256_fast\nalias crypto-sha256 sha256_fast\n",
        softdep="softdep user pre: sha256\n",
        builtin=["kernel/crypto/sha256_generic.ko"],
        builtin_modinfo=b"sha256_generic.alias=sha256\x00sha256_generic.license=GPL\x00",
    )
    index = load(modules_dir)
    assert index.resolve(["sha256"]) == []
    assert index.is_builtin("sha256")
    assert names(index.resolve(["crypto-sha256"])) == ["sha256_fast"]
    assert names(index.resolve(["user"])) == ["user"]


def test_optional_files_are_parsed_once_per_index(tmp_path: Path) -> None:
    modules_dir = softdep_tree(tmp_path)
    index = load(modules_dir)
    first = index.resolve(["fs"])
    for name in ("modules.dep", "modules.softdep", "modules.alias", "modules.builtin"):
        (modules_dir / name).unlink()
    # Nothing is re-read: aliases, softdeps and builtins still apply, to new names too.
    assert index.resolve(["fs"]) == first
    assert names(index.resolve(["journal"])) == ["crc_common", "crc_generic", "journal"]
    assert index.is_builtin("zlib_inflate")


# -- errors --------------------------------------------------------------------------------------


def test_unknown_name_lists_close_names_and_the_release(tmp_path: Path) -> None:
    modules_dir = make_tree(
        tmp_path, {ko("ata_piix"): [ko("libata")], ko("libata"): [], ko("virtio_blk"): []}
    )
    with pytest.raises(UnknownModuleError) as caught:
        load(modules_dir).resolve(["virtio_blk", "ata_pix"])
    error = caught.value
    assert isinstance(error, ConfigError)
    assert "ata_piix" in error.suggestions
    assert "virtio_blk" not in error.suggestions
    assert "'ata_pix'" in str(error) and "ata_piix" in str(error) and RELEASE in str(error)


def test_unknown_name_without_close_names_says_so(tmp_path: Path) -> None:
    with pytest.raises(UnknownModuleError, match="no module has a close name") as caught:
        load(make_tree(tmp_path, {ko("ata_piix"): []})).resolve(["zzzzzzzz"])
    assert caught.value.suggestions == ()


@pytest.mark.parametrize(
    ("dep", "cycle"),
    [
        ({"a": ["b"], "b": ["c"], "c": ["a"]}, "a -> b -> c -> a"),
        ({"self": ["self"]}, "self -> self"),
        ({"top": ["x"], "x": ["y"], "y": ["x"]}, "x -> y -> x"),
    ],
)
def test_cycle_is_a_config_error_naming_the_cycle(
    tmp_path: Path, dep: dict[str, list[str]], cycle: str
) -> None:
    modules_dir = make_tree(tmp_path, {ko(m): [ko(d) for d in deps] for m, deps in dep.items()})
    with pytest.raises(ConfigError) as caught:
        load(modules_dir).resolve([next(iter(dep))])
    assert not isinstance(caught.value, UnknownModuleError)
    assert cycle in str(caught.value)
    assert "modules.dep" in str(caught.value)


def test_cycle_through_a_softdep_is_marked(tmp_path: Path) -> None:
    modules_dir = make_tree(
        tmp_path, {ko("a"): [ko("b")], ko("b"): []}, softdep="softdep b pre: a\n"
    )
    with pytest.raises(ConfigError, match=r"a -> b -\(softdep\)-> a"):
        load(modules_dir).resolve(["a"])


def test_missing_modules_dep_says_how_to_run_depmod(tmp_path: Path) -> None:
    modules_dir = tmp_path / "root" / "lib" / "modules" / RELEASE
    modules_dir.mkdir(parents=True)
    with pytest.raises(ConfigError) as caught:
        load(modules_dir)
    message = str(caught.value)
    assert str(modules_dir / "modules.dep") in message
    assert f"depmod -b {tmp_path / 'root'} {RELEASE}" in message


def test_missing_modules_dep_outside_a_lib_modules_tree(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"depmod -b ROOT {RELEASE}"):
        load(tmp_path)


def test_missing_modules_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope")


@pytest.mark.parametrize(
    "line", ["kernel/a.ko kernel/b.ko", "kernel/a.txt: kernel/b.ko", "kernel/a.ko: b.txt"]
)
def test_malformed_modules_dep_line_names_file_and_line(tmp_path: Path, line: str) -> None:
    (tmp_path / "modules.dep").write_text(f"kernel/ok.ko:\n\n{line}\n")
    with pytest.raises(ConfigError, match=r"modules\.dep:3: ") as caught:
        load(tmp_path)
    assert line.split()[0] in str(caught.value) or "b.txt" in str(caught.value)


def test_module_listed_twice_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text("kernel/a/x.ko:\nkernel/b/x.ko.xz:\n")
    with pytest.raises(ConfigError, match=r"modules\.dep:2: module x is listed twice"):
        load(tmp_path)


def test_module_file_missing_on_disk(tmp_path: Path) -> None:
    modules_dir = make_tree(tmp_path, {ko("a"): [ko("b")], ko("b"): []})
    (modules_dir / ko("b")).unlink()
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load(modules_dir).resolve(["a"])
    assert str(modules_dir / ko("b")) in str(caught.value)


# -- vermagic ------------------------------------------------------------------------------------

SUFFIXES = [".ko", ".ko.xz", ".ko.gz", ".ko.zst"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_vermagic_is_read_from_plain_and_compressed_modules(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"mod{suffix}"
    write_ko(path)
    assert read_vermagic(path) == "6.1.0-test SMP mod_unload "


def test_matching_vermagic_passes_for_every_compression(tmp_path: Path) -> None:
    modules_dir = make_tree(tmp_path, {ko("top"): [ko(f"m{i}", s) for i, s in enumerate(SUFFIXES)]})
    index = load(modules_dir)
    modules = index.resolve(["top"])
    assert len(modules) == len(SUFFIXES) + 1
    index.check_vermagic(modules)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_vermagic_mismatch_names_module_vermagic_and_release(tmp_path: Path, suffix: str) -> None:
    modules_dir = make_tree(tmp_path, {ko("good"): [], ko("bad", suffix): []})
    write_ko(modules_dir / ko("bad", suffix), b"\x00vermagic=6.1.0-other SMP mod_unload \x00")
    index = load(modules_dir)
    index.check_vermagic(index.resolve(["good"]))
    with pytest.raises(VermagicMismatchError) as caught:
        index.check_vermagic(index.resolve(["good", "bad"]))
    error = caught.value
    assert isinstance(error, ConfigError)
    assert error.path == modules_dir / ko("bad", suffix)
    assert error.vermagic == "6.1.0-other SMP mod_unload "
    message = str(error)
    assert str(modules_dir / ko("bad", suffix)) in message
    assert "6.1.0-other SMP mod_unload" in message and repr(RELEASE) in message
    assert "another kernel build" in message


def test_release_must_equal_the_whole_first_word(tmp_path: Path) -> None:
    # "6.1.0-test" is a prefix of "6.1.0-test2": still another kernel.
    modules_dir = make_tree(tmp_path, {ko("a"): []})
    write_ko(modules_dir / ko("a"), b"\x00vermagic=6.1.0-test2 SMP \x00")
    index = load(modules_dir)
    with pytest.raises(VermagicMismatchError):
        index.check_vermagic(index.resolve(["a"]))


def test_module_without_vermagic(tmp_path: Path) -> None:
    modules_dir = make_tree(tmp_path, {ko("a"): []})
    (modules_dir / ko("a")).write_bytes(b"\x7fELF\x00license=GPL\x00")
    index = load(modules_dir)
    with pytest.raises(ConfigError, match="no vermagic"):
        index.check_vermagic(index.resolve(["a"]))


def test_vermagic_must_start_an_entry(tmp_path: Path) -> None:
    path = tmp_path / "a.ko"
    path.write_bytes(b"\x00xvermagic=wrong \x00vermagic=right one\x00")
    assert read_vermagic(path) == "right one"


@pytest.mark.parametrize("suffix", [".ko.xz", ".ko.gz", ".ko.zst"])
def test_damaged_compressed_module(tmp_path: Path, suffix: str) -> None:
    if suffix == ".ko.zst" and shutil.which("zstd") is None:
        pytest.skip("needs the zstd program")
    path = tmp_path / f"a{suffix}"
    path.write_bytes(b"definitely not compressed" * 4)
    with pytest.raises(ConfigError, match="cannot be decompressed") as caught:
        read_vermagic(path)
    assert str(path) in str(caught.value)


def test_zst_module_without_zstd_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.ko.zst"
    write_ko(path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MissingToolError, match="apt-get install zstd"):
        read_vermagic(path)


# -- a real kernel -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_modules_dir() -> Path:
    """A provisioned kernel's lib/modules/<release>: $BOOTHARNESS_TEST_MODULES_DIR, else the
    default kernel of the repository's kernels.toml, provisioned into the cache."""
    value = os.environ.get(MODULES_DIR_ENV)
    if not value:
        from harness import cache
        from harness.kernel import catalogue as config
        from harness.kernel import provision as kernels

        catalogue = config.load_catalogue(Path(__file__).resolve().parents[2] / "kernels.toml")
        kernel = kernels.provision(catalogue.get(catalogue.default), cache.cache_root())
        assert kernel.modules_dir is not None
        value = str(kernel.modules_dir)
    path = Path(value)
    if not (path / "modules.dep").is_file():
        pytest.fail(f"{MODULES_DIR_ENV}={value} has no modules.dep")
    return path


@pytest.fixture(scope="module")
def real_index(real_modules_dir: Path) -> ModuleIndex:
    return ModuleIndex.load(real_modules_dir, real_modules_dir.name)


@pytest.fixture(scope="module")
def real_graph(real_modules_dir: Path) -> dict[str, list[str]]:
    """modules.dep as name -> hard dependency names, read independently of the index."""
    graph: dict[str, list[str]] = {}
    for line in (real_modules_dir / "modules.dep").read_text().splitlines():
        head, _, tail = line.partition(":")
        graph[_module_name(head)] = [_module_name(dep) for dep in tail.split()]
    return graph


def _module_name(relpath: str) -> str:
    return relpath.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")


def _alias_targets(modules_dir: Path, alias: str) -> set[str]:
    targets = set()
    for line in (modules_dir / "modules.alias").read_text().splitlines():
        words = line.split()
        if len(words) == 3 and words[1] == alias:
            targets.add(words[2].replace("-", "_"))
    return targets


def _require_module(index: ModuleIndex, *wanted: str) -> None:
    missing = [name for name in wanted if name not in index.names()]
    if missing:
        pytest.skip(f"kernel {index.release} has no loadable {', '.join(missing)}")


def test_real_ata_piix_and_sd_mod(
    real_index: ModuleIndex, real_graph: dict[str, list[str]]
) -> None:
    _require_module(real_index, "ata_piix", "sd_mod")
    result = names(real_index.resolve(["ata_piix", "sd_mod"]))
    assert {"ata_piix", "sd_mod", "scsi_mod", "libata", "scsi_common"} <= set(result)
    assert closure(real_graph, ["ata_piix", "sd_mod"]) <= set(result)
    if "t10_pi" in real_graph["sd_mod"]:
        assert {"t10_pi", "crc_t10dif", "crct10dif_common"} <= set(result)
    assert_load_order(result, real_graph)
    assert result.index("scsi_mod") < result.index("libata") < result.index("ata_piix")


def test_real_ext4_brings_its_deps_and_crc32c_softdep(
    real_index: ModuleIndex, real_graph: dict[str, list[str]], real_modules_dir: Path
) -> None:
    _require_module(real_index, "ext4")
    result = names(real_index.resolve(["ext4"]))
    assert {"jbd2", "mbcache", "crc16"} <= set(result)
    assert_load_order(result, real_graph)
    providers = _alias_targets(real_modules_dir, "crypto-crc32c")
    chosen = [name for name in result if name in providers]
    if not real_index.is_builtin("crypto-crc32c"):
        # The softdep: exactly one crc32c provider, before jbd2 and ext4 that ask for it.
        assert len(chosen) == 1, result
        assert result.index(chosen[0]) < result.index("jbd2") < result.index("ext4")
        if "crc32c_generic" in providers:
            assert chosen == ["crc32c_generic"]


def test_real_builtin_resolves_to_nothing(real_index: ModuleIndex, real_modules_dir: Path) -> None:
    builtin = (real_modules_dir / "modules.builtin").read_text().split()
    if not builtin:
        pytest.skip("this kernel has no modules.builtin entries")
    name = _module_name(builtin[0])
    assert real_index.is_builtin(name)
    assert real_index.resolve([name]) == []


def test_real_unknown_name_suggests_close_names(real_index: ModuleIndex) -> None:
    _require_module(real_index, "ata_piix")
    with pytest.raises(UnknownModuleError) as caught:
        real_index.resolve(["ata_pix"])
    assert "ata_piix" in caught.value.suggestions
    assert real_index.release in str(caught.value)


def test_real_vermagic_matches_and_another_release_does_not(
    real_index: ModuleIndex, real_modules_dir: Path
) -> None:
    _require_module(real_index, "ext4", "sd_mod")
    modules = real_index.resolve(["ext4", "sd_mod"])
    real_index.check_vermagic(modules)
    other = ModuleIndex.load(real_modules_dir, real_index.release + "-other")
    with pytest.raises(VermagicMismatchError, match="another kernel build"):
        other.check_vermagic(modules)


def _modprobe_order(modules_dir: Path, name: str) -> list[str] | None:
    modprobe = shutil.which("modprobe") or shutil.which("modprobe", path="/usr/sbin:/sbin")
    if modprobe is None or modules_dir.parent.name != "modules":
        return None
    root = modules_dir.parent.parent.parent
    # -C /dev/null: the host's modprobe.d must not change the answer.
    argv = [modprobe, "-C", "/dev/null", "-d", str(root), "-S", modules_dir.name]
    proc = subprocess.run(
        [*argv, "--show-depends", name],
        capture_output=True,
        text=True,
        check=True,
    )
    order: list[str] = []
    for line in proc.stdout.splitlines():
        words = line.split()
        if words and words[0] == "insmod":
            module = _module_name(words[1])
            if module not in order:
                order.append(module)
    return order


# Modules with at most one softdep line: kmod honours only the first (see harness.kernel.modules).
@pytest.mark.parametrize("name", ["ata_piix", "sd_mod", "ext4", "virtio_blk", "xfs", "nfsd"])
def test_real_order_agrees_with_modprobe(
    real_index: ModuleIndex, real_modules_dir: Path, name: str
) -> None:
    _require_module(real_index, name)
    expected = _modprobe_order(real_modules_dir, name)
    if expected is None:
        pytest.skip("needs kmod's modprobe and a ROOT/lib/modules/<release> folder")
    ours = names(real_index.resolve([name]))
    # Same modules in the same order; modprobe may load more only where a softdep names an
    # alias with several matches (crc32c: crc32c_generic and crc32c_intel): it loads every
    # match, the resolver one. Any other module modprobe loads and we do not is a failure.
    extras = [module for module in expected if module not in ours]
    assert set(extras) <= _alias_siblings(real_modules_dir, set(ours)), extras
    assert ours == [module for module in expected if module in ours]
    assert set(ours) <= set(expected)


def _alias_siblings(modules_dir: Path, chosen: set[str]) -> set[str]:
    """Modules sharing a ``modules.alias`` name with a chosen one, read from the file itself."""
    by_alias: dict[str, set[str]] = {}
    for line in (modules_dir / "modules.alias").read_text().splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            by_alias.setdefault(words[1], set()).add(words[2].replace("-", "_"))
    siblings: set[str] = set()
    for matches in by_alias.values():
        if matches & chosen:
            siblings |= matches - chosen
    return siblings
