"""kernels.toml's source kind (tree = / linux_source =): what is accepted, and every problem
named with its key and a fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.kernel.catalogue import (
    MINIMAL_CONFIG,
    SHIPPED_FRAGMENTS,
    CatalogueError,
    DebianPackage,
    SourceTree,
    load_catalogue,
)
from harness.kernel.provision import debug_package_of

PKG = "linux-image-6.1.0-56-amd64-unsigned"


def fake_tree(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Makefile").write_text("# kernel\n")
    (folder / "Kconfig").write_text("# kconfig\n")
    return folder


def write(folder: Path, text: str) -> Path:
    path = folder / "kernels.toml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(path)
    return caught.value.problems


def test_a_tree_with_the_defaults_is_the_minimal_kernel(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")
    cat = load_catalogue(write(tmp_path, '[kernels."mine"]\ntree = "linux"\n'))
    assert cat.get("mine").source == SourceTree(tree=tree, config=MINIMAL_CONFIG)


def test_a_source_package_with_config_fragments_and_debug_info(tmp_path: Path) -> None:
    (tmp_path / "extra.config").write_text("CONFIG_X=y\n")
    cat = load_catalogue(
        write(
            tmp_path,
            """
            [kernels."deb"]
            debian_package = "PKG"
            [kernels."src"]
            linux_source = "linux-source-6.1"
            config = "kernel:deb"
            fragments = ["debug", "extra.config"]
            debug_info = true
            tags = ["source"]
            """.replace("PKG", PKG),
        )
    )
    source = cat.get("src").source
    assert isinstance(source, SourceTree)
    assert source.package == "linux-source-6.1" and source.tree is None
    assert source.config == "kernel:deb"
    assert source.base_kernel is not None and source.base_kernel.source == DebianPackage(PKG)
    assert source.fragments == (SHIPPED_FRAGMENTS / "debug.config", tmp_path / "extra.config")
    assert source.debug_info is True
    assert source.label == "linux-source-6.1"


@pytest.mark.parametrize("config", ["defconfig", "tinyconfig", "x86_64_defconfig", "minimal"])
def test_make_targets_are_base_configs(tmp_path: Path, config: str) -> None:
    fake_tree(tmp_path / "linux")
    cat = load_catalogue(write(tmp_path, f'[kernels."k"]\ntree = "linux"\nconfig = "{config}"\n'))
    source = cat.get("k").source
    assert isinstance(source, SourceTree)
    assert (source.config, source.config_file) == (config, None)


def test_a_config_file_is_a_base_config(tmp_path: Path) -> None:
    fake_tree(tmp_path / "linux")
    (tmp_path / "my.config").write_text("CONFIG_A=y\n")
    cat = load_catalogue(write(tmp_path, '[kernels."k"]\ntree = "linux"\nconfig = "my.config"\n'))
    source = cat.get("k").source
    assert isinstance(source, SourceTree)
    assert (source.config, source.config_file) == ("file", tmp_path / "my.config")


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ('tree = "nowhere"', "tree", "does not exist"),
        ('tree = "empty"', "tree", "no Makefile and Kconfig"),
        ('linux_source = "linux-image-6.1"', "linux_source", 'linux_source = "linux-source-6.1"'),
        ('tree = "linux"\nconfig = "no-such.config"', "config", "does not exist"),
        ('tree = "linux"\nconfig = 3', "config", "non-empty string"),
        ('tree = "linux"\nfragments = "debug"', "fragments", "list of strings"),
        ('tree = "linux"\nfragments = ["debgu"]', "fragments", "did you mean 'debug'"),
        ('tree = "linux"\ndebug_info = "yes"', "debug_info", "true or false"),
        ('tree = "linux"\nsystem_map = "x"', "system_map", "from the build"),
        ('vmlinuz = "linux/Makefile"\nfragments = []', "fragments", "only applies"),
        ('tree = "linux"\nconfig = "kernel:nobody"', "config", "no kernel 'nobody'"),
        ('tree = "linux"\nconfig = "kernel:other"', "config", "built from source too"),
    ],
)
def test_problems_name_the_key_and_a_fix(tmp_path: Path, body: str, key: str, words: str) -> None:
    fake_tree(tmp_path / "linux")
    (tmp_path / "empty").mkdir()
    text = f'[kernels."k"]\n{body}\n[kernels."other"]\ntree = "linux"\n'
    found = problems(write(tmp_path, text))
    assert len(found) == 1, found
    assert f"kernel 'k': key '{key}'" in found[0], found
    assert words in found[0], found


def test_two_sources_at_once_is_one_problem(tmp_path: Path) -> None:
    fake_tree(tmp_path / "linux")
    found = problems(write(tmp_path, f'[kernels."k"]\ntree = "linux"\ndebian_package = "{PKG}"\n'))
    assert len(found) == 1 and "debian_package and tree" in found[0], found


def test_debug_symbols_only_on_debian_packages(tmp_path: Path) -> None:
    fake_tree(tmp_path / "linux")
    cat = load_catalogue(
        write(tmp_path, f'[kernels."d"]\ndebian_package = "{PKG}"\ndebug_symbols = true\n')
    )
    assert cat.get("d").source == DebianPackage(PKG, debug_symbols=True)
    found = problems(write(tmp_path, '[kernels."k"]\ntree = "linux"\ndebug_symbols = true\n'))
    assert len(found) == 1 and "debug_info = true" in found[0], found
    found = problems(
        write(tmp_path, f'[kernels."d"]\ndebian_package = "{PKG}"\ndebug_symbols = "y"\n')
    )
    assert len(found) == 1 and "true or false" in found[0], found


def test_the_debug_package_of_an_image_package() -> None:
    assert debug_package_of(PKG) == "linux-image-6.1.0-56-amd64-dbg"
    assert debug_package_of("linux-image-6.1.0-56-cloud-amd64") == (
        "linux-image-6.1.0-56-cloud-amd64-dbg"
    )
