"""harness.kernel.catalogue: parsing, validation messages, selection and lookup of kernels.toml."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from harness.kernel.catalogue import (
    ENV_VAR,
    SHIPPED_CATALOGUE,
    Catalogue,
    CatalogueError,
    DebianPackage,
    KernelEntry,
    LocalFiles,
    SourceTree,
    find_catalogue,
    load_catalogue,
)
from harness.outcome import ConfigError, Outcome

SHIPPED = Path(__file__).resolve().parents[2] / "kernels.toml"
PKG = "linux-image-6.1.0-56-amd64-unsigned"


def write(folder: Path, text: str, name: str = "kernels.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(path)
    error = caught.value
    assert error.outcome is Outcome.CONFIG_ERROR
    for problem in error.problems:
        assert problem in str(error)
    return error.problems


def only_problem(path: Path) -> str:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


# --- the shipped catalogue --------------------------------------------------------------------


def test_shipped_catalogue_loads_with_the_stock_kernel_as_default() -> None:
    catalogue = load_catalogue(SHIPPED)
    assert catalogue.default == "debian-6.1-amd64"
    default = catalogue.get(catalogue.default)
    assert default.source == DebianPackage("linux-image-6.1.0-56-amd64-unsigned")
    assert catalogue.select([]) == [default]
    assert "default" in default.tags
    packages = [k for k in catalogue.kernels if isinstance(k.source, DebianPackage)]
    built = [k.name for k in catalogue.kernels if isinstance(k.source, SourceTree)]
    assert len(packages) + len(built) == len(catalogue.kernels)
    assert built == ["minimal-6.1"]


def test_shipped_catalogue_nightly_and_bisect_sets() -> None:
    catalogue = load_catalogue(SHIPPED)
    nightly = {kernel.name for kernel in catalogue.select(["nightly"])}
    assert nightly == {
        "debian-6.1-amd64",
        "debian-6.1-cloud-amd64",
        "debian-6.1.0-47-amd64",
        "debian-6.12-amd64",
    }
    bisect = catalogue.select(["tag:bisect"])
    assert "debian-6.1-cloud-amd64" in {kernel.name for kernel in bisect}
    # Bisect walks file order, so the bisect kernels must be oldest ABI first.
    abis = []
    for kernel in bisect:
        assert isinstance(kernel.source, DebianPackage)
        match = re.fullmatch(
            r"linux-image-6\.1\.0-(\d+)-cloud-amd64-unsigned", kernel.source.package
        )
        assert match, kernel.source.package
        abis.append(int(match.group(1)))
    assert abis == sorted(abis)
    assert set(abis) == {47, 50, 53, 54, 55, 56}


# --- syntax and structure ---------------------------------------------------------------------


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, 'default = "a"\n[kernels.a]\ndebian_package = \n')
    problem = only_problem(path)
    assert problem.startswith(f"{path}:3:")
    assert "invalid TOML" in problem
    assert "debian_package =" in problem


def test_toml_error_at_end_of_document_points_at_the_last_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[kernels.a]\ndebian_package = "x"\ntags = ["a"\n')
    problem = only_problem(path)
    assert problem.startswith(f"{path}:3:")
    assert "Unclosed array" in problem


def test_kernel_declared_twice_says_names_must_be_unique(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [kernels.a]
        debian_package = "{PKG}"
        [kernels.a]
        debian_package = "{PKG}"
        """,
    )
    problem = only_problem(path)
    assert "invalid TOML" in problem
    assert "only once" in problem


def test_invalid_character_in_table_header_suggests_quoting(tmp_path: Path) -> None:
    path = write(tmp_path, f'[kernels.a+b]\ndebian_package = "{PKG}"\n')
    problem = only_problem(path)
    assert f"{path}:1:" in problem
    assert '[kernels."NAME"]' in problem


def test_unquoted_dotted_name_is_recognised_and_quoting_suggested(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        default = "debian-6.1-amd64"
        [kernels.debian-6.1-amd64]
        debian_package = "{PKG}"
        [kernels.debian-6.12-amd64]
        debian_package = "{PKG}"
        """,
    )
    problems = problems_of(path)
    assert len(problems) == 2, problems  # and `default`, naming the intended kernel, is fine
    assert "kernel 'debian-6'" in problems[0]
    assert '[kernels."debian-6.1-amd64"]' in problems[0]
    assert '[kernels."debian-6.12-amd64"]' in problems[1]


def test_missing_kernels_table(tmp_path: Path) -> None:
    path = write(tmp_path, 'default = "a"\n')
    problem = only_problem(path)
    assert str(path) in problem
    assert "[kernels] table is missing" in problem
    assert 'vmlinuz = "path/to/bzImage"' in problem


def test_empty_kernels_table(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path, "[kernels]\n"))
    assert "[kernels] is empty" in problem


def test_kernels_that_is_not_a_table(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path, "kernels = 3\n"))
    assert "key 'kernels' must be a table" in problem
    assert "got 3" in problem


def test_kernel_that_is_not_a_table(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path, f'[kernels]\nfoo = "{PKG}"\n'))
    assert "kernel 'foo'" in problem
    assert "must be a table" in problem
    assert '[kernels."foo"]' in problem


def test_unknown_top_level_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, f'defualt = "a"\n[kernels.a]\ndebian_package = "{PKG}"\n')
    problem = only_problem(path)
    assert "key 'defualt' is not known" in problem
    assert "did you mean 'default'?" in problem


# --- one kernel -------------------------------------------------------------------------------


def test_kernel_without_source(tmp_path: Path) -> None:
    path = write(tmp_path, '[kernels.foo]\nnote = "nothing to boot"\n')
    problem = only_problem(path)
    assert f"{path}: kernel 'foo': has no source" in problem
    assert "debian_package =" in problem
    assert "vmlinuz =" in problem


def test_kernel_with_both_sources(tmp_path: Path) -> None:
    (tmp_path / "bzImage").write_bytes(b"kernel")
    path = write(tmp_path, f'[kernels.foo]\ndebian_package = "{PKG}"\nvmlinuz = "bzImage"\n')
    problem = only_problem(path)
    assert "kernel 'foo'" in problem
    assert "both debian_package and vmlinuz" in problem
    assert "keep one" in problem


def test_unknown_kernel_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, f'[kernels.foo]\ndebian_package = "{PKG}"\ncmdlin = "quiet"\n')
    problem = only_problem(path)
    assert f"{path}: kernel 'foo': key 'cmdlin' is not known" in problem
    assert "did you mean 'cmdline'?" in problem


def test_unknown_kernel_key_without_close_match_lists_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, f'[kernels.foo]\ndebian_package = "{PKG}"\nzzzzzz = 1\n')
    problem = only_problem(path)
    assert "key 'zzzzzz' is not known" in problem
    assert "known keys:" in problem
    assert "'system_map'" in problem


@pytest.mark.parametrize(
    ("line", "key", "got", "fix"),
    [
        ("tags = 3", "tags", "got 3", 'write tags = ["a", "b"]'),
        ('tags = "nightly"', "tags", 'got "nightly"', 'write tags = ["a", "b"]'),
        ('tags = ["a", 3]', "tags", "got 3 (an integer) at position 2", "write tags = ["),
        ("cmdline = 3", "cmdline", "got 3", 'write cmdline = "'),
        ("note = true", "note", "got true", 'write note = "'),
    ],
)
def test_wrong_types_name_kernel_key_value_and_fix(
    tmp_path: Path, line: str, key: str, got: str, fix: str
) -> None:
    path = write(tmp_path, f'[kernels.foo]\ndebian_package = "{PKG}"\n{line}\n')
    problem = only_problem(path)
    assert problem.startswith(f"{path}: kernel 'foo': key '{key}' must be")
    assert got in problem
    assert fix in problem


def test_source_keys_of_the_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, "[kernels.a]\ndebian_package = 5\n[kernels.b]\nvmlinuz = [1]\n")
    first, second = problems_of(path)
    assert "kernel 'a': key 'debian_package' must be a string, got 5" in first
    assert f'write debian_package = "{PKG}"' in first
    assert "kernel 'b': key 'vmlinuz' must be a string path, got a list" in second


def test_cmdline_must_be_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, f'[kernels.foo]\ndebian_package = "{PKG}"\ncmdline = "a\\nb"\n')
    problem = only_problem(path)
    assert "key 'cmdline' must be one line" in problem


@pytest.mark.parametrize("name", ["has space", "-leading-dash", ".hidden", "a/b", "tag:x", "é"])
def test_invalid_kernel_names(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, f'[kernels."{name}"]\ndebian_package = "{PKG}"\n')
    problem = only_problem(path)
    assert f"kernel {name!r}" in problem
    assert "name is not valid" in problem
    suggested = re.search(r'\[kernels\."([^"]*)"\]', problem)
    assert suggested, problem
    # The suggested rename must itself be accepted.
    load_catalogue(write(tmp_path, f'[kernels."{suggested.group(1)}"]\ndebian_package = "{PKG}"\n'))


def test_empty_kernel_name(tmp_path: Path) -> None:
    path = write(tmp_path, f'[kernels.""]\ndebian_package = "{PKG}"\n')
    problem = only_problem(path)
    assert "kernel ''" in problem
    assert "empty name" in problem


def test_names_with_every_allowed_character_load(tmp_path: Path) -> None:
    path = write(tmp_path, f'[kernels."A-z_0.9+x"]\ndebian_package = "{PKG}"\n')
    assert load_catalogue(path).names == ("A-z_0.9+x",)


def test_invalid_tag(tmp_path: Path) -> None:
    path = write(tmp_path, f'[kernels.foo]\ndebian_package = "{PKG}"\ntags = ["ok", "not ok"]\n')
    problem = only_problem(path)
    assert "kernel 'foo': key 'tags' has tag 'not ok', which is not valid" in problem


def test_tag_equal_to_another_kernels_name_is_ambiguous(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [kernels.a]
        debian_package = "{PKG}"
        tags = ["b", "a"]
        [kernels.b]
        debian_package = "{PKG}"
        """,
    )
    problem = only_problem(path)  # a tag equal to the kernel's own name is harmless
    assert "kernel 'a': key 'tags' has tag 'b'" in problem
    assert "ambiguous" in problem
    assert "rename the tag or that kernel" in problem


def test_tag_clash_is_reported_even_when_the_kernel_has_other_problems(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [kernels.a]
        debian_package = "{PKG}"
        [kernels.b]
        tags = ["a"]
        """,
    )
    first, second = problems_of(path)
    assert "kernel 'b': has no source" in first
    assert "kernel 'b': key 'tags' has tag 'a'" in second


def test_default_tag_only_on_the_default_kernel(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        default = "a"
        [kernels.a]
        debian_package = "{PKG}"
        [kernels.b]
        debian_package = "{PKG}"
        tags = ["default"]
        """,
    )
    problem = only_problem(path)
    assert "kernel 'b': key 'tags' has tag 'default' but the default kernel is 'a'" in problem
    assert 'default = "b"' in problem


def test_duplicate_tags_are_dropped_keeping_the_first(tmp_path: Path) -> None:
    path = write(
        tmp_path, f'[kernels.foo]\ndebian_package = "{PKG}"\ntags = ["x", "y", "x", "y", "z"]\n'
    )
    assert load_catalogue(path).get("foo").tags == ("x", "y", "z")


@pytest.mark.parametrize(
    "package",
    [
        "linux-headers-6.1.0-56-amd64",
        "linux-image-amd64",
        "linux-image-6.1.0-56-amd64-dbg",
        "Linux-Image-6.1.0",
        "",
    ],
)
def test_package_that_is_not_a_kernel_image(tmp_path: Path, package: str) -> None:
    path = write(tmp_path, f'[kernels.foo]\ndebian_package = "{package}"\n')
    problem = only_problem(path)
    assert "kernel 'foo': key 'debian_package'" in problem
    assert "does not look like a Debian kernel image package" in problem
    assert f'write debian_package = "{PKG}"' in problem


def test_local_only_keys_are_rejected_for_a_package(tmp_path: Path) -> None:
    path = write(tmp_path, f'[kernels.foo]\ndebian_package = "{PKG}"\nsystem_map = "System.map"\n')
    problem = only_problem(path)
    assert "kernel 'foo': key 'system_map' only applies to local kernels" in problem
    assert "remove it" in problem


# --- local files ------------------------------------------------------------------------------


def make_build(folder: Path) -> Path:
    """A fake kernel build tree beside (not inside) the folder of kernels.toml."""
    build = folder / "linux"
    (build / "arch/x86/boot").mkdir(parents=True)
    (build / "arch/x86/boot/bzImage").write_bytes(b"kernel")
    (build / "mods/lib/modules/6.9.0").mkdir(parents=True)
    (build / ".config").write_text("CONFIG_X=y\n")
    (build / "System.map").write_text("ffffffff81000000 T _text\n")
    return build


LOCAL = """
[kernels.my-build]
vmlinuz = "../linux/arch/x86/boot/bzImage"
modules = "../linux/mods/lib/modules/6.9.0"
config = "../linux/.config"
system_map = "../linux/System.map"
"""


def test_relative_local_paths_resolve_against_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = make_build(tmp_path)
    (tmp_path / "project").mkdir()
    path = write(tmp_path / "project", LOCAL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current folder must not matter
    source = load_catalogue(path).get("my-build").source
    assert source == LocalFiles(
        vmlinuz=(build / "arch/x86/boot/bzImage").resolve(),
        modules=(build / "mods/lib/modules/6.9.0").resolve(),
        config=(build / ".config").resolve(),
        system_map=(build / "System.map").resolve(),
    )


def test_relative_kernels_path_still_resolves_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = make_build(tmp_path)
    (tmp_path / "project").mkdir()
    write(tmp_path / "project", LOCAL)
    monkeypatch.chdir(tmp_path)
    source = load_catalogue(Path("project/kernels.toml")).get("my-build").source
    assert isinstance(source, LocalFiles)
    assert source.vmlinuz == (build / "arch/x86/boot/bzImage").resolve()


def test_local_paths_expand_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    build = make_build(home)
    monkeypatch.setenv("HOME", str(home))
    path = write(tmp_path, '[kernels.mine]\nvmlinuz = "~/linux/arch/x86/boot/bzImage"\n')
    source = load_catalogue(path).get("mine").source
    assert isinstance(source, LocalFiles)
    assert source.vmlinuz == (build / "arch/x86/boot/bzImage").resolve()
    assert source.modules is None
    assert source.config is None
    assert source.system_map is None


def test_missing_local_file_says_resolved_path_and_what_it_was_relative_to(tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    path = write(tmp_path / "project", '[kernels.mine]\nvmlinuz = "../linux/bzImage"\n')
    problem = only_problem(path)
    assert "kernel 'mine': key 'vmlinuz'" in problem
    assert str(tmp_path.resolve() / "linux" / "bzImage") in problem
    assert f"relative to {tmp_path / 'project'}" in problem
    assert "does not exist" in problem


def test_modules_folder_without_modules_dep_is_fine(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    path = write(
        tmp_path,
        '[kernels.mine]\nvmlinuz = "linux/arch/x86/boot/bzImage"\n'
        'modules = "linux/mods/lib/modules/6.9.0"\n',
    )
    assert not (build / "mods/lib/modules/6.9.0/modules.dep").exists()
    source = load_catalogue(path).get("mine").source
    assert isinstance(source, LocalFiles)
    assert source.modules == (build / "mods/lib/modules/6.9.0").resolve()


def test_modules_that_is_not_a_folder(tmp_path: Path) -> None:
    make_build(tmp_path)
    path = write(
        tmp_path,
        '[kernels.mine]\nvmlinuz = "linux/arch/x86/boot/bzImage"\nmodules = "linux/.config"\n',
    )
    problem = only_problem(path)
    assert "kernel 'mine': key 'modules'" in problem
    assert "is not a folder" in problem
    assert "modules.dep" in problem


def test_file_key_that_names_a_folder(tmp_path: Path) -> None:
    make_build(tmp_path)
    path = write(tmp_path, '[kernels.mine]\nvmlinuz = "linux/arch"\n')
    problem = only_problem(path)
    assert "kernel 'mine': key 'vmlinuz'" in problem
    assert "is not a file" in problem


def test_empty_local_path(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path, '[kernels.mine]\nvmlinuz = ""\n'))
    assert "key 'vmlinuz' must not be empty" in problem


# --- default ----------------------------------------------------------------------------------


def test_default_naming_an_unknown_kernel_suggests_close_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        default = "debian-6.1-amd"
        [kernels."debian-6.1-amd64"]
        debian_package = "{PKG}"
        [kernels.zzz]
        debian_package = "{PKG}"
        """,
    )
    problem = only_problem(path)
    assert f"{path}: key 'default' is 'debian-6.1-amd'" in problem
    assert "did you mean 'debian-6.1-amd64'?" in problem
    assert "'zzz'" in problem  # listed among the known kernels


def test_default_of_the_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, f'default = 1\n[kernels.foo]\ndebian_package = "{PKG}"\n')
    problem = only_problem(path)
    assert "key 'default' must be a kernel name, got 1" in problem
    assert 'default = "foo"' in problem


def test_without_default_the_first_kernel_is_the_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [kernels.zeta]
        debian_package = "{PKG}"
        [kernels.alpha]
        debian_package = "{PKG}"
        """,
    )
    catalogue = load_catalogue(path)
    assert catalogue.default == "zeta"
    assert [kernel.name for kernel in catalogue.select([])] == ["zeta"]


def test_default_naming_a_broken_kernel_is_not_reported_twice(tmp_path: Path) -> None:
    path = write(tmp_path, 'default = "foo"\n[kernels.foo]\nnote = "no source"\n')
    problem = only_problem(path)
    assert "kernel 'foo': has no source" in problem


# --- every problem at once --------------------------------------------------------------------


def test_every_problem_is_reported_in_one_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        default = "nope"
        colour = "blue"
        [kernels.a]
        debian_package = "linux-headers-6.1"
        tags = 3
        [kernels.b]
        note = "no source"
        [kernels.c]
        vmlinuz = "missing/bzImage"
        cmdlin = "quiet"
        """,
    )
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(path)
    problems = caught.value.problems
    expected = [
        "key 'colour' is not known",
        "kernel 'a': key 'tags' must be a list of strings",
        "kernel 'a': key 'debian_package'",
        "kernel 'b': has no source",
        "kernel 'c': key 'cmdlin' is not known",
        "kernel 'c': key 'vmlinuz'",
        "key 'default' is 'nope'",
    ]
    assert len(problems) == len(expected), problems
    for fragment in expected:
        assert sum(fragment in problem for problem in problems) == 1, (fragment, problems)
    message = str(caught.value)
    assert message.startswith(f"{path}: {len(expected)} problems:\n")
    assert message.splitlines()[1:] == problems
    assert all(problem.startswith(str(path)) for problem in problems)


def test_missing_file_is_a_catalogue_error(tmp_path: Path) -> None:
    problem = only_problem(tmp_path / "kernels.toml")
    assert "no such file" in problem
    assert ENV_VAR in problem


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "kernels.toml"
    path.write_bytes(b'[kernels.a]\nnote = "\xff"\n')
    assert "not UTF-8" in only_problem(path)


# --- selection and lookup ---------------------------------------------------------------------


def entry(name: str, *tags: str) -> KernelEntry:
    return KernelEntry(name=name, source=DebianPackage(PKG), tags=tags, cmdline="", note="")


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    return Catalogue(
        path=tmp_path / "kernels.toml",
        kernels=(
            entry("one", "default", "fast"),
            entry("two", "fast", "slow"),
            entry("three", "slow", "one-ish"),
        ),
        default="one",
    )


def test_matches_name_tag_and_tag_prefix() -> None:
    kernel = entry("alpha", "fast")
    assert kernel.matches("alpha")
    assert kernel.matches("fast")
    assert kernel.matches("tag:fast")
    assert not kernel.matches("tag:alpha")  # tag: matches tags only
    assert not kernel.matches("beta")
    assert not kernel.matches("tag:beta")


def test_select_nothing_gives_the_default(catalogue: Catalogue) -> None:
    assert catalogue.select([]) == [catalogue.get("one")]


def test_select_by_name_tag_and_tag_prefix(catalogue: Catalogue) -> None:
    assert [k.name for k in catalogue.select(["three"])] == ["three"]
    assert [k.name for k in catalogue.select(["slow"])] == ["two", "three"]
    assert [k.name for k in catalogue.select(["tag:fast"])] == ["one", "two"]


def test_select_deduplicates_and_keeps_file_order(catalogue: Catalogue) -> None:
    picked = catalogue.select(["three", "fast", "one", "tag:slow"])
    assert [k.name for k in picked] == ["one", "two", "three"]


def test_select_unknown_lists_every_unmatched_selector_and_what_exists(
    catalogue: Catalogue,
) -> None:
    with pytest.raises(ConfigError) as caught:
        catalogue.select(["one", "fsat", "tag:slwo", "tag:one"])
    message = str(caught.value)
    assert str(catalogue.path) in message
    assert "'fsat' (did you mean 'fast'?)" in message
    assert "'tag:slwo' (did you mean 'tag:slow'?)" in message
    assert "'tag:one'" in message  # 'one' is a name, not a tag
    assert "known kernels: 'one', 'two', 'three'" in message
    assert "known tags: 'default', 'fast', 'slow', 'one-ish'" in message


def test_get_unknown_names_the_file_and_close_names(catalogue: Catalogue) -> None:
    with pytest.raises(ConfigError) as caught:
        catalogue.get("tow")
    message = str(caught.value)
    assert str(catalogue.path) in message
    assert "no kernel named 'tow'" in message
    assert "did you mean 'two'" in message


def test_loaded_objects_are_frozen(tmp_path: Path) -> None:
    catalogue = load_catalogue(write(tmp_path, f'[kernels.foo]\ndebian_package = "{PKG}"\n'))
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalogue.default = "bar"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalogue.kernels[0].tags = ()  # type: ignore[misc]


# --- finding the file -------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_find_explicit_file_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = write(tmp_path, "", name="mine.toml")
    monkeypatch.setenv(ENV_VAR, str(write(tmp_path, "", name="env.toml")))
    assert find_catalogue(chosen) == chosen
    assert find_catalogue(str(chosen)) == chosen


def test_find_explicit_folder_means_its_kernels_toml(tmp_path: Path, no_env: None) -> None:
    path = write(tmp_path, "")
    assert find_catalogue(tmp_path) == path


def test_find_explicit_missing_is_an_error(tmp_path: Path, no_env: None) -> None:
    with pytest.raises(ConfigError, match="given explicitly"):
        find_catalogue(tmp_path / "nope.toml")


def test_find_uses_the_environment_before_searching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = write(tmp_path, "", name="env.toml")
    write(tmp_path, "")  # would be found by the search
    monkeypatch.setenv(ENV_VAR, str(from_env))
    assert find_catalogue(start=tmp_path) == from_env


def test_find_environment_path_missing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError) as caught:
        find_catalogue(start=tmp_path)
    assert ENV_VAR in str(caught.value)
    assert "gone.toml" in str(caught.value)


def test_find_searches_upwards_from_start(tmp_path: Path, no_env: None) -> None:
    path = write(tmp_path, "")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert find_catalogue(start=deep) == path


def test_find_defaults_to_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_env: None
) -> None:
    path = write(tmp_path, "")
    monkeypatch.chdir(tmp_path)
    assert find_catalogue() == path


def test_find_nothing_falls_back_to_the_shipped_catalogue(tmp_path: Path, no_env: None) -> None:
    if any((folder / "kernels.toml").exists() for folder in tmp_path.parents):
        pytest.skip("a kernels.toml exists above the temporary folder")
    found = find_catalogue(start=tmp_path)
    assert found == SHIPPED_CATALOGUE
    assert load_catalogue(found).default  # the shipped catalogue is valid and has a default
