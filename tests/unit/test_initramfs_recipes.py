"""Recipe records (harness.image.recipe): a warm build names its image without building, and
every input that decides the image's bytes voids the record when it changes: a template file,
a template folder's listing, a file of the spec, a module file, the image itself."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness.image import cpio, initramfs, recipe
from harness.image.initramfs import InitramfsSpec
from tests.unit.test_initramfs import TREE, fake_kernel, make_tree


def touch_later(path: Path, text: str) -> None:
    """Rewrite ``path`` so its identity surely changes (new size or a later mtime)."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "mine.sh.j2").write_text("#!/bin/sh\necho {{ word }}\n")
    return folder


def build(kernel_dir: Path, cache: Path, templates: Path, **spec: object) -> initramfs.Initramfs:
    kernel = fake_kernel(
        kernel_dir, modules_dir=kernel_dir / "root" / "lib" / "modules" / "6.1.0-test"
    )
    full = InitramfsSpec(template="mine.sh.j2", template_dirs=(templates,), **spec)  # type: ignore[arg-type]
    return initramfs.build(kernel, full, cache)


def test_a_warm_build_comes_from_the_record_without_rendering(
    tmp_path: Path, templates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path, TREE)
    cache = tmp_path / "cache"
    first = build(tmp_path, cache, templates, variables={"word": "hi"}, modules=["top"])
    assert first.built
    records = list((cache / "initramfs" / recipe.FOLDER).glob("*.json"))
    assert len(records) == 1

    def no_render(*args: object, **kwargs: object) -> str:
        raise AssertionError("rendered although the record holds")

    monkeypatch.setattr(initramfs.templates, "render", no_render)
    second = build(tmp_path, cache, templates, variables={"word": "hi"}, modules=["top"])
    assert not second.built
    assert (second.path, second.digest, second.init_script) == (
        first.path,
        first.digest,
        first.init_script,
    )
    assert [m.name for m in second.modules] == [m.name for m in first.modules]


def words_in(image: initramfs.Initramfs) -> str:
    init = next(e for e in cpio.read_archive(image.path.read_bytes()) if e.path == "init")
    return init.data.decode()


def test_a_changed_template_is_seen(tmp_path: Path, templates: Path) -> None:
    make_tree(tmp_path, TREE)
    cache = tmp_path / "cache"
    build(tmp_path, cache, templates, variables={"word": "hi"})
    touch_later(templates / "mine.sh.j2", "#!/bin/sh\necho changed {{ word }}\n")
    image = build(tmp_path, cache, templates, variables={"word": "hi"})
    assert image.built and "changed hi" in words_in(image)


def test_a_template_added_in_an_earlier_folder_is_seen(tmp_path: Path, templates: Path) -> None:
    make_tree(tmp_path, TREE)
    cache = tmp_path / "cache"
    build(tmp_path, cache, templates, variables={"word": "hi"})
    time.sleep(0.01)
    (templates / "other.j2").write_text("")  # the folder's listing changed
    again = build(tmp_path, cache, templates, variables={"word": "hi"})
    assert not again.built  # same bytes, so the image itself is a cache hit...
    records = list((tmp_path / "cache" / "initramfs" / recipe.FOLDER).glob("*.json"))
    assert len(records) == 1  # ... and the record was made again, under the same key


def test_a_changed_file_of_the_spec_or_module_is_seen(tmp_path: Path, templates: Path) -> None:
    modules_dir = make_tree(tmp_path, TREE)
    cache = tmp_path / "cache"
    extra = tmp_path / "extra.txt"
    extra.write_text("one")
    first = build(
        tmp_path, cache, templates, variables={"word": "x"}, files={"etc/x": extra}, modules=["mid"]
    )
    touch_later(extra, "two!")
    second = build(
        tmp_path, cache, templates, variables={"word": "x"}, files={"etc/x": extra}, modules=["mid"]
    )
    assert second.built and second.digest != first.digest
    module = modules_dir / "kernel/drivers/test/mid.ko"
    data = module.read_bytes()
    module.write_bytes(data + b"\0")
    third = build(
        tmp_path, cache, templates, variables={"word": "x"}, files={"etc/x": extra}, modules=["mid"]
    )
    assert third.built and third.digest != second.digest


def test_a_missing_image_is_built_again(tmp_path: Path, templates: Path) -> None:
    make_tree(tmp_path, TREE)
    cache = tmp_path / "cache"
    first = build(tmp_path, cache, templates, variables={"word": "hi"})
    first.path.unlink()
    again = build(tmp_path, cache, templates, variables={"word": "hi"})
    assert again.built and again.path.exists()


def test_variables_that_are_not_plain_data_get_no_record(tmp_path: Path, templates: Path) -> None:
    make_tree(tmp_path, TREE)
    cache = tmp_path / "cache"
    build(tmp_path, cache, templates, variables={"word": object()})
    assert not (cache / "initramfs" / recipe.FOLDER).exists()
