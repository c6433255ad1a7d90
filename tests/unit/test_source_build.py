"""harness.kernel.source without a compiler run: build keys, output folders, first errors."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from harness.cli.main import main
from harness.kernel import source
from harness.kernel.catalogue import SourceTree
from harness.outcome import ConfigError, Outcome


def git_tree(path: Path) -> Path:
    path.mkdir()
    (path / "Makefile").write_text("all:\n")
    (path / "Kconfig").write_text("\n")
    (path / "kernel" / "configs").mkdir(parents=True)
    (path / "kernel" / "configs" / "tiny.config").write_text("CONFIG_EMBEDDED=y\n")
    subprocess.run(["git", "-C", str(path), "init", "-q"], check=True)
    commit_all(path, "1")
    return path


def commit_all(tree: Path, message: str) -> None:
    """Commit every change in ``tree`` (new files too)."""
    subprocess.run(["git", "-C", str(tree), "add", "-A"], check=True)
    identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "-C", str(tree), *identity, "commit", "-qm", message], check=True)


def test_keys_follow_tree_state_config_and_fragments(tmp_path: Path) -> None:
    tree = git_tree(tmp_path / "linux")
    extra = tmp_path / "extra.config"
    extra.write_text("CONFIG_A=y\n")
    base = SourceTree(tree=tree, fragments=(extra,))
    cache = tmp_path / "cache"
    first = source.plan(base, cache, progress=False)
    assert source.plan(base, cache, progress=False).key == first.key  # same inputs, same key
    assert first.state.commit and first.output.parent == cache / "kernels" / "source" / "out"
    names = [name for name, _ in first.config_inputs]
    assert names == ["base", "minimal", str(extra)]

    (tree / "init.c").write_text("int x;\n")  # a change in the tree: a new key...
    edited = source.plan(base, cache, progress=False)
    assert edited.key != first.key
    assert edited.build_dir == first.build_dir  # ...built incrementally in the same folder

    extra.write_text("CONFIG_A=m\n")  # another option: another key, the same build folder
    other = source.plan(base, cache, progress=False)
    assert other.key != edited.key and other.build_dir == edited.build_dir
    defconfig = source.plan(dataclasses.replace(base, config="defconfig"), cache, progress=False)
    assert defconfig.build_dir != other.build_dir  # another base config: another folder

    debug = source.plan(dataclasses.replace(base, debug_info=True), cache, progress=False)
    assert debug.build_dir != other.build_dir
    assert [name for name, _ in debug.config_inputs][-1] == "debug"


def test_a_tree_configured_in_place_is_refused_before_make(tmp_path: Path) -> None:
    tree = git_tree(tmp_path / "linux")
    (tree / ".config").write_text("CONFIG_A=y\n")
    with pytest.raises(ConfigError, match="make mrproper"):
        source.plan(SourceTree(tree=tree), tmp_path / "cache", progress=False)


def test_a_remembered_failure_is_raised_without_building(tmp_path: Path) -> None:
    tree = git_tree(tmp_path / "linux")
    plan = source.plan(SourceTree(tree=tree), tmp_path / "cache", progress=False)
    plan.failure.parent.mkdir(parents=True)
    plan.failure.write_text(
        '{"tree": "linux at 1", "first_error": "init/main.c:1:1: error: x", "log": "/l"}'
    )
    with pytest.raises(source.BuildError) as caught:
        source.build("k", plan, progress=False)
    assert caught.value.first_error == "init/main.c:1:1: error: x"
    assert caught.value.outcome is Outcome.INFRA_ERROR  # git bisect run: skip (125)
    assert caught.value.outcome.bisect_code == 125


@pytest.mark.parametrize(
    ("log", "first"),
    [
        (
            "  CC      init/main.o\n"
            "/src/init/main.c: In function 'start_kernel':\n"
            "/src/init/main.c:960:9: error: 'bogus' undeclared (first use in this function)\n"
            "/src/init/main.c:961:2: error: expected ';'\n"
            "make[2]: *** [scripts/Makefile.build:250: init/main.o] Error 1\n",
            "/src/init/main.c:960:9: error: 'bogus' undeclared (first use in this function)",
        ),
        (
            "  LD      vmlinux.o\nld: init/main.o: in function `x':\n"
            "main.c:(.text+0x5): undefined reference to `nothing'\nmake: *** [Makefile] Error 2\n",
            "main.c:(.text+0x5): undefined reference to `nothing'",
        ),
        (
            'ERROR: modpost: "foo" [drivers/x.ko] undefined!\n',
            'ERROR: modpost: "foo" [drivers/x.ko] undefined!',
        ),
        (
            "make[1]: *** No rule to make target 'x'.  Stop.\n",
            "make[1]: *** No rule to make target 'x'.  Stop.",
        ),
        ("  CC      init/main.o\n", ""),
    ],
)
def test_first_error_is_the_line_that_says_why(log: str, first: str) -> None:
    assert source.first_error(log) == first


FAKE_KBUILD = """\
# A stand-in for kbuild: configures, then fails to compile like gcc does.
O ?= .
defconfig:
\t@echo defconfig >> $(O)/../make-calls
\t@printf 'CONFIG_MODULES=y\\n' > $(O)/.config
olddefconfig:
\t@true
modules:
\t@true
bzImage:
\t@echo bzImage >> $(O)/../make-calls
\t@echo '  CC      init/main.o'
\t@echo "init/main.c:960:9: error: 'bogus' undeclared (first use in this function)"
\t@echo 'make[2]: *** [scripts/Makefile.build:250: init/main.o] Error 1'
\t@exit 2
"""


def fake_kernel_tree(path: Path) -> Path:
    tree = git_tree(path)
    (tree / "Makefile").write_text(FAKE_KBUILD)
    commit_all(tree, "2")
    return tree


def test_a_failed_build_carries_the_first_error_and_is_remembered(tmp_path: Path) -> None:
    tree = fake_kernel_tree(tmp_path / "linux")
    plan = source.plan(SourceTree(tree=tree, config="defconfig"), tmp_path / "c", progress=False)
    with pytest.raises(source.BuildError) as caught:
        source.build("fake", plan, progress=False)
    first = "init/main.c:960:9: error: 'bogus' undeclared (first use in this function)"
    assert caught.value.first_error == first
    assert caught.value.log_path.is_file() and first in caught.value.log_path.read_text()
    assert not plan.output.exists(), "a failed build leaves no cache entry"
    calls = plan.build_dir.parent / "make-calls"
    assert calls.read_text().split() == ["defconfig", "bzImage"]
    with pytest.raises(source.BuildError, match="remembered"):
        source.build("fake", plan, progress=False)
    assert calls.read_text().split() == ["defconfig", "bzImage"], "no make the second time"
    with pytest.raises(source.BuildError):
        source.build("fake", plan, progress=False, force=True)
    assert calls.read_text().split().count("bzImage") == 2


def test_bisect_step_skips_a_commit_that_does_not_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = fake_kernel_tree(tmp_path / "linux")
    catalogue = tmp_path / "kernels.toml"
    catalogue.write_text(f'[kernels."tree"]\ntree = "{tree}"\nconfig = "defconfig"\n')
    argv = ["--kernels", str(catalogue), "--cache", str(tmp_path / "c")]
    code = main(["bisect-step", "-k", "tree", *argv, "--", "boot", "--accel", "tcg"])
    out = capsys.readouterr().out
    assert code == 125, out
    assert "tree does not build: init/main.c:960:9: error: 'bogus' undeclared" in out
    assert "build log: " in out and "skip (exit 125)" in out


def test_a_failure_while_the_tree_changed_is_not_remembered(tmp_path: Path) -> None:
    tree = fake_kernel_tree(tmp_path / "linux")
    makefile = tree / "Makefile"
    # The "compile" edits the tree as a checkout in another shell would, then fails.
    makefile.write_text(
        makefile.read_text().replace("\t@exit 2\n", "\t@echo edit >> $(CURDIR)/init.c\n\t@exit 2\n")
    )
    commit_all(tree, "3")
    plan = source.plan(SourceTree(tree=tree, config="defconfig"), tmp_path / "c", progress=False)
    with pytest.raises(source.BuildError):
        source.build("fake", plan, progress=False)
    assert not plan.failure.exists()
