"""Tests of harness.image.templates: strict, auto-quoting Jinja2 rendering of init scripts.

Quoting is proven by running, not by reading: rendered snippets are executed with the same
``busybox sh`` that runs /init, in a private folder, and what the shell saw is compared byte
for byte with the value that went in.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness import tools
from harness.image import templates
from harness.image.initramfs import InitramfsSpec, template_variables
from harness.image.templates import TemplateError, render
from harness.outcome import ConfigError

# Every character class a shell treats specially, in one value each and all together.
HOSTILE = [
    "it's",
    'say "hi"',
    "$(touch {pwned}/subst)",
    "`touch {pwned}/backtick`",
    "a; touch {pwned}/semicolon",
    "true && touch {pwned}/and",
    "false || touch {pwned}/or",
    "x | tee {pwned}/pipe",
    "> {pwned}/redirect",
    "*",
    "?[a-z]*",
    "~root",
    "$HOME ${PATH} $1 $$ $?",
    "line one\nline two\n",
    "\n\n",
    "tab\there",
    "back\\slash\\n",
    "--option",
    "-n",
    "",
    " leading and trailing spaces ",
    "é ü 日本",
    "'\"'\"'",  # quotes that end and reopen a quoted word
    "#not a comment",
    "a=b c=d",
    "{a,b}",
    "!history",
    'all: it\'s "$(touch {pwned}/all)" `id` ; && * \n ~ $x',
]


def busybox() -> str:
    return tools.require("busybox")


def write_template(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return folder


def run_sh(script: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``script`` with busybox sh in ``cwd``; stdin closed, no inherited positional args."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [busybox(), "sh", "-c", script],
        cwd=cwd,
        capture_output=True,
        check=False,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )


def render_text(
    tmp_path: Path, text: str, variables: Mapping[str, Any], name: str = "t.sh.j2"
) -> str:
    folder = write_template(tmp_path / "templates", name, text)
    return render(name, variables, extra_dirs=[folder])


def hostile_values(pwned: Path) -> list[str]:
    return [value.replace("{pwned}", str(pwned)) for value in HOSTILE]


# -- strict undefined -------------------------------------------------------------------------


def test_missing_variable_is_an_error_naming_template_and_variable(tmp_path: Path) -> None:
    folder = write_template(tmp_path, "needs.sh.j2", "echo {{ present }} {{ absent_thing }}\n")
    with pytest.raises(TemplateError) as caught:
        render("needs.sh.j2", {"present": "x"}, extra_dirs=[folder])
    message = str(caught.value)
    assert "needs.sh.j2" in message
    assert "absent_thing" in message
    assert isinstance(caught.value, ConfigError)


def test_missing_variable_in_a_condition_is_an_error_too(tmp_path: Path) -> None:
    # Plain Undefined is falsy in {% if %}: a typo would silently skip a block.
    folder = write_template(tmp_path, "cond.sh.j2", "{% if flagg %}\necho on\n{% endif %}\n")
    with pytest.raises(TemplateError, match="flagg"):
        render("cond.sh.j2", {"flag": True}, extra_dirs=[folder])


def test_all_variables_given_renders(tmp_path: Path) -> None:
    folder = write_template(tmp_path, "needs.sh.j2", "echo {{ present }} {{ absent_thing }}\n")
    text = render("needs.sh.j2", {"present": "x", "absent_thing": "y"}, extra_dirs=[folder])
    assert text == "echo x y\n"


def test_jinja_syntax_error_names_template_and_line(tmp_path: Path) -> None:
    folder = write_template(tmp_path, "bad.sh.j2", "echo ok\necho ok\n{% if %}\n")
    with pytest.raises(TemplateError, match=r"bad\.sh\.j2:3"):
        render("bad.sh.j2", {}, extra_dirs=[folder])


# -- values stay data -------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(HOSTILE)))
def test_value_in_an_assignment_stays_data(tmp_path: Path, index: int) -> None:
    pwned = tmp_path / "pwned"
    pwned.mkdir()
    value = hostile_values(pwned)[index]
    script = render_text(tmp_path, "x={{ value }}\nprintf '%s' \"$x\" > out\n", {"value": value})
    work = tmp_path / "run"
    result = run_sh(script, work)
    assert result.returncode == 0, result.stderr
    assert (work / "out").read_bytes() == value.encode()
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    assert list(pwned.iterdir()) == []


@pytest.mark.parametrize("index", range(len(HOSTILE)))
def test_value_as_a_command_argument_is_exactly_one_word(tmp_path: Path, index: int) -> None:
    # Unquoted in argument position a value would be split, globbed and expanded; the
    # files below give a glob something to match.
    pwned = tmp_path / "pwned"
    pwned.mkdir()
    value = hostile_values(pwned)[index]
    script = render_text(
        tmp_path,
        "set -- {{ value }}\nprintf '%s' \"$#\" > count\nprintf '%s' \"$1\" > out\n",
        {"value": value},
    )
    work = tmp_path / "run"
    work.mkdir()
    (work / "aaa").write_text("")
    (work / "bbb").write_text("")
    result = run_sh(script, work)
    assert result.returncode == 0, result.stderr
    assert (work / "count").read_text() == "1"
    assert (work / "out").read_bytes() == value.encode()
    assert sorted(p.name for p in work.iterdir()) == ["aaa", "bbb", "count", "out"]
    assert list(pwned.iterdir()) == []


def test_non_string_values_are_quoted_as_their_text(tmp_path: Path) -> None:
    script = render_text(
        tmp_path,
        "printf '%s|' {{ number }} {{ path }} {{ flag }} > out\n",
        {"number": 10, "path": Path("/a b/c"), "flag": True},
    )
    result = run_sh(script, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "out").read_text() == "10|/a b/c|True|"


def test_q_filter_does_not_quote_twice(tmp_path: Path) -> None:
    text = render_text(tmp_path, "echo {{ value | q }} {{ value }}\n", {"value": "a b"})
    assert text == "echo 'a b' 'a b'\n"


# -- |raw and |words --------------------------------------------------------------------------


def test_raw_inserts_code_unquoted(tmp_path: Path) -> None:
    code = "echo one > out; echo two >> out"
    script = render_text(tmp_path, "{{ code | raw }}\n", {"code": code})
    assert code in script.splitlines()
    result = run_sh(script, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "out").read_text() == "one\ntwo\n"


def test_same_code_without_raw_is_one_inert_word(tmp_path: Path) -> None:
    code = "echo one > out; echo two >> out"
    script = render_text(tmp_path, "{{ code }} 2>/dev/null\n", {"code": code})
    result = run_sh(script, tmp_path / "run")
    assert result.returncode == 127  # the whole text is taken as one command name
    assert list((tmp_path / "run").iterdir()) == []


def test_words_quotes_each_item_as_its_own_word(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    pwned.mkdir()
    items = hostile_values(pwned)
    script = render_text(
        tmp_path,
        "set -- {{ items | words }}\n"
        "printf '%s' \"$#\" > count\n"
        "for item; do printf '%s\\0' \"$item\"; done > out\n",
        {"items": items},
    )
    work = tmp_path / "run"
    result = run_sh(script, work)
    assert result.returncode == 0, result.stderr
    assert (work / "count").read_text() == str(len(items))
    assert (work / "out").read_bytes() == b"".join(item.encode() + b"\0" for item in items)
    assert list(pwned.iterdir()) == []


def test_words_of_an_empty_list_is_no_word(tmp_path: Path) -> None:
    script = render_text(
        tmp_path, "set -- {{ items | words }}\nprintf '%s' \"$#\" > count\n", {"items": []}
    )
    result = run_sh(script, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "count").read_text() == "0"


# -- sh -n ------------------------------------------------------------------------------------


def test_template_rendering_broken_shell_is_rejected_with_the_shells_message(
    tmp_path: Path,
) -> None:
    folder = write_template(tmp_path, "broken.sh.j2", "if true; then\n  echo {{ value }}\n")
    with pytest.raises(TemplateError) as caught:
        render("broken.sh.j2", {"value": "x"}, extra_dirs=[folder])
    message = str(caught.value)
    assert "broken.sh.j2" in message
    assert "syntax error" in message
    assert "fi" in message  # busybox: unexpected end of file (expecting "fi")
    assert "/tmp/" not in message.replace(str(tmp_path), "")  # not the temporary file's name


def test_broken_shell_passes_when_the_check_is_off(tmp_path: Path) -> None:
    folder = write_template(tmp_path, "broken.sh.j2", "if true; then\n  echo {{ value }}\n")
    text = render("broken.sh.j2", {"value": "x"}, extra_dirs=[folder], check_syntax=False)
    assert text == "if true; then\n  echo x\n"


def test_check_shell_syntax_accepts_valid_and_rejects_invalid() -> None:
    templates.check_shell_syntax("case x in x) echo ok ;; esac\n", name="ok")
    with pytest.raises(TemplateError, match="'bad'"):
        templates.check_shell_syntax("case x in x) echo ok ;;\n", name="bad")


# -- lookup -----------------------------------------------------------------------------------


def test_unknown_template_lists_every_searched_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = tmp_path / "extra"
    from_env = tmp_path / "env"
    extra.mkdir()
    from_env.mkdir()
    monkeypatch.setenv(templates.TEMPLATES_ENV, str(from_env))
    with pytest.raises(TemplateError) as caught:
        render("no-such.sh.j2", {}, extra_dirs=[extra])
    message = str(caught.value)
    assert "no-such.sh.j2" in message
    for folder in (extra, from_env, templates.BUILTIN_TEMPLATES):
        assert str(folder) in message
    assert templates.DEFAULT_TEMPLATE in message  # what could be used instead


def test_missing_extra_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="does-not-exist"):
        render(templates.DEFAULT_TEMPLATE, {}, extra_dirs=[tmp_path / "does-not-exist"])


def test_user_folders_take_precedence_over_shipped_templates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = templates.DEFAULT_TEMPLATE
    extra = write_template(tmp_path / "extra", name, "echo from-extra\n")
    from_env = write_template(tmp_path / "env", name, "echo from-env\n")
    monkeypatch.delenv(templates.TEMPLATES_ENV, raising=False)
    assert "mark PASS" in render(name, template_variables(InitramfsSpec(), []))

    monkeypatch.setenv(templates.TEMPLATES_ENV, str(from_env))
    assert render(name, {}) == "echo from-env\n"
    assert render(name, {}, extra_dirs=[extra]) == "echo from-extra\n"
    assert templates.template_dirs([extra]) == [extra, from_env, templates.BUILTIN_TEMPLATES]


def test_env_folders_are_searched_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_template(tmp_path / "first", "x.sh.j2", "echo first\n")
    second = write_template(tmp_path / "second", "x.sh.j2", "echo second\n")
    write_template(second, "only-second.sh.j2", "echo only\n")
    monkeypatch.setenv(templates.TEMPLATES_ENV, f"{first}:{second}")
    assert render("x.sh.j2", {}) == "echo first\n"
    assert render("only-second.sh.j2", {}) == "echo only\n"
    assert {"x.sh.j2", "only-second.sh.j2", templates.DEFAULT_TEMPLATE} <= set(
        templates.list_templates()
    )


def test_declarations_read_the_template_the_renderer_would_render(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm boot reads a template's declarations without Jinja2: same folders, same order,
    same refusals as the renderer's loader."""
    first = write_template(tmp_path / "first", "sub/x.sh.j2", "{# bootharness: markers=off #}\n")
    second = write_template(tmp_path / "second", "sub/x.sh.j2", "echo second\n")
    monkeypatch.setenv(templates.TEMPLATES_ENV, f"{first}:{second}")
    for name in ("sub/x.sh.j2", "./sub//x.sh.j2"):
        assert templates.template_source(name) == (first / "sub/x.sh.j2").read_text()
        assert render(name, {}) == ""  # the renderer took the first folder's too
        assert templates.prints_markers(name) is False
    shipped_source = (templates.BUILTIN_TEMPLATES / templates.DEFAULT_TEMPLATE).read_text()
    assert templates.template_source(templates.DEFAULT_TEMPLATE) == shipped_source
    for refused in ("../first/sub/x.sh.j2", "sub/../sub/x.sh.j2", "", "sub"):
        with pytest.raises(TemplateError, match=r"not found in: .*first.*second"):
            templates.template_source(refused)
        with pytest.raises(TemplateError, match="not found"):
            render(refused, {})
    with pytest.raises(TemplateError, match="does-not-exist"):
        templates.prints_markers("sub/x.sh.j2", extra_dirs=[tmp_path / "does-not-exist"])


# -- the shipped init.sh.j2 -------------------------------------------------------------------


def shipped(variables: Mapping[str, Any], modules: Sequence[str] = ()) -> str:
    """Render the shipped init with the variables initramfs.build gives it."""
    return render(
        templates.DEFAULT_TEMPLATE,
        template_variables(InitramfsSpec(variables=dict(variables)), modules),
    )


def preamble(script: str) -> str:
    """The shipped init up to its first action: the variables and the helper functions."""
    head, found, _ = script.partition("\nmkdir -p /proc")
    assert found, "the shipped init no longer starts its work with `mkdir -p /proc`"
    return head + "\n"


def test_shipped_init_without_root_and_commands(tmp_path: Path) -> None:
    script = shipped({})
    assert script.startswith("#!/bin/sh\n")
    assert "switch_root" in script
    assert "mark RUN" not in script
    assert "insmod" not in script
    result = run_sh(preamble(script) + 'printf "%s|%s" "$root" "$after" > out\n', tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out").read_text() == "|poweroff"


def test_shipped_init_with_root_label(tmp_path: Path) -> None:
    script = shipped({"root": "LABEL=x", "root_fstype": "ext4", "root_mode": "rw"})
    result = run_sh(
        preamble(script) + 'printf "%s|%s|%s" "$root" "$root_fstype" "$root_mode" > out\n',
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out").read_text() == "LABEL=x|ext4|rw"


def test_shipped_init_with_commands_and_modules() -> None:
    commands = ["echo hello", "test -e /proc/version && cat /proc/version"]
    modules = ["/lib/modules/r/kernel/a.ko", "/lib/modules/r/kernel/b.ko"]
    script = shipped({"commands": commands}, modules)
    lines = script.splitlines()
    assert [line.split(" ||")[0] for line in lines if line.startswith("insmod ")] == [
        f"insmod {m}" for m in modules
    ]
    for index, command in enumerate(commands, start=1):
        # Each command runs as code, after its RUN marker.
        assert lines[lines.index(f"mark RUN {index}") + 1] == command
    assert "mark MODULES-LOADED 2" in lines


def test_shipped_init_keeps_hostile_values_as_data(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    pwned.mkdir()
    hostile = hostile_values(pwned)[-1]
    variables = {
        "root": "LABEL=" + hostile,
        "root_fstype": hostile,
        "root_mode": hostile,
        "after": hostile,
        "nonce": "n'$(touch " + str(pwned / "nonce") + ")",
        # Commands are code on purpose, but the copy quoted into the failure message is data.
        "commands": ["printf '%s\\n' \"it's; $(echo x)\" `echo y` && true # \"'`"],
    }
    script = shipped(variables)  # passes sh -n, or render raises
    work = tmp_path / "run"
    result = run_sh(
        preamble(script)
        + 'printf "%s\\0" "$root" "$root_fstype" "$root_mode" "$after" "$nonce" > out\n',
        work,
    )
    assert result.returncode == 0, result.stderr
    expected = [variables[k] for k in ("root", "root_fstype", "root_mode", "after", "nonce")]
    assert (work / "out").read_bytes() == b"".join(str(v).encode() + b"\0" for v in expected)
    assert list(pwned.iterdir()) == []
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def test_shipped_init_with_quiet_console() -> None:
    assert "echo 1 > /proc/sys/kernel/printk" in shipped({"quiet_console": True})
    assert "echo 1 > /proc/sys/kernel/printk" not in shipped({"quiet_console": False})


def test_shipped_init_rejects_unknown_variables_it_uses(tmp_path: Path) -> None:
    # Rendering the shipped template without the harness's defaults is a clear error.
    with pytest.raises(TemplateError, match=r"init\.sh\.j2"):
        render(templates.DEFAULT_TEMPLATE, {})


# -- the success marker -----------------------------------------------------------------------


@pytest.mark.parametrize("commands", [[], ["true"], ["echo done"]])
def test_success_marker_is_not_in_the_script_text(commands: list[str]) -> None:
    nonce = "n0nce42"
    script = shipped({"nonce": nonce, "commands": commands, "root": ""})
    assert f"[bootharness:{nonce}] PASS" not in script
    # Not even split by quoting: no line joins the prefix to the nonce.
    assert not [line for line in script.splitlines() if f"bootharness:{nonce}" in line]
    assert f"bootharness:{nonce}" not in script.replace("'", "").replace('"', "")


def test_success_marker_is_made_at_run_time(tmp_path: Path) -> None:
    nonce = "n0nce42"
    script = shipped({"nonce": nonce})
    result = run_sh(preamble(script) + "mark PASS\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"[bootharness:{nonce}] PASS\n".encode()


def test_nonce_from_the_kernel_command_line_when_none_is_rendered() -> None:
    script = shipped({})
    assert "nonce=''" in script.splitlines()
    assert "bootharness.nonce=" in script
