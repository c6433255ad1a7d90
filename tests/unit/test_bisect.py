"""The bisection algorithm with a fake oracle, the verdict cache, and the CLI's pure parts."""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from pathlib import Path

import pytest

from harness.bisect.oracles import junit_outcomes, pytest_outcome, worst
from harness.bisect.search import Observation, Status, Verdict, bisect, max_verdicts
from harness.bisect.verdicts import CACHEABLE, VerdictCache, verdict_key
from harness.cli import main as cli
from harness.cli.bisect import STEP_ABORT, STEP_BUG, STEP_SKIP, bisect_candidates
from harness.kernel.catalogue import load_catalogue
from harness.outcome import ConfigError, InfraError, Outcome

BAD_OUTCOMES = (Outcome.TEST_FAIL, Outcome.KERNEL_FAULT, Outcome.BOOT_TIMEOUT)


class FakeOracle:
    """Candidates ``first_bad`` and later are bad; ``infra`` ones fail to be judged."""

    def __init__(
        self,
        names: list[str],
        first_bad: int,
        infra: Collection[int] = (),
        bad_outcome: Outcome = Outcome.TEST_FAIL,
        raise_infra: bool = False,
    ) -> None:
        self.names = names
        self.first_bad = first_bad
        self.infra = {names[i] for i in infra}
        self.bad_outcome = bad_outcome
        self.raise_infra = raise_infra
        self.calls: list[str] = []

    def __call__(self, name: str) -> Observation:
        self.calls.append(name)
        if name in self.infra:
            if self.raise_infra:
                raise InfraError(f"QEMU would not start for {name}")
            return Observation(Outcome.INFRA_ERROR, message="QEMU crashed")
        if self.names.index(name) >= self.first_bad:
            return Observation(self.bad_outcome, Path(f"/logs/{name}"), "check failed")
        return Observation(Outcome.PASS)


def names_of(count: int) -> list[str]:
    return [f"k{i:02d}" for i in range(count)]


def test_max_verdicts_is_the_ends_plus_ceil_log2_of_the_gaps() -> None:
    for count in range(2, 70):
        assert max_verdicts(count) == 2 + math.ceil(math.log2(count - 1))


@pytest.mark.parametrize("count", [*range(2, 20), 33, 64, 65, 100])
def test_finds_every_boundary_within_the_bound_judging_ends_first(count: int) -> None:
    names = names_of(count)
    for first_bad in range(1, count):
        oracle = FakeOracle(names, first_bad, bad_outcome=BAD_OUTCOMES[first_bad % 3])
        result = bisect(names, oracle)
        assert result.status is Status.FOUND, result.render()
        assert result.first_bad == names[first_bad]
        assert result.last_good == names[first_bad - 1]
        assert result.suspects == (names[first_bad],)
        assert oracle.calls[:2] == [names[0], names[-1]]
        assert len(oracle.calls) == len(set(oracle.calls)), "a candidate was judged twice"
        assert len(oracle.calls) <= 2 + math.ceil(math.log2(count - 1))
        assert [s.candidate for s in result.steps] == oracle.calls
        assert result.boots == len(oracle.calls)
        assert result.status.exit_code == 0


def test_failing_log_of_the_first_bad_is_reported() -> None:
    names = names_of(8)
    result = bisect(names, FakeOracle(names, 5))
    assert f"failing log: /logs/{names[5]}" in result.render()
    assert f"first bad:   {names[5]}" in result.render()
    assert f"last good:   {names[4]}" in result.render()


@pytest.mark.parametrize("raise_infra", [False, True], ids=["returned", "raised"])
def test_infra_error_at_a_step_is_skipped_and_a_neighbour_probed(raise_infra: bool) -> None:
    names = names_of(6)
    # The first probe of 0..5 is the middle, 2: make it unbootable.
    oracle = FakeOracle(names, first_bad=4, infra=[2], raise_infra=raise_infra)
    result = bisect(names, oracle)
    assert oracle.calls[2] == names[2]
    assert oracle.calls[3] in (names[1], names[3]), "the next probe is a neighbour"
    assert result.status is Status.FOUND
    assert (result.last_good, result.first_bad) == (names[3], names[4])
    step = result.step_of(names[2])
    assert step is not None and step.verdict is Verdict.SKIP
    assert result.skipped == (names[2],)


def test_skips_next_to_the_boundary_give_a_range_never_a_bad_verdict() -> None:
    names = names_of(9)
    oracle = FakeOracle(names, first_bad=6, infra=[4, 5])
    result = bisect(names, oracle)
    assert result.status is Status.AMBIGUOUS
    assert result.status.exit_code == 1
    assert result.last_good == names[3]
    assert result.first_bad == names[6]
    assert result.suspects == (names[4], names[5], names[6])
    assert "could be:    " + ", ".join(result.suspects) in result.render()


def test_random_skips_never_make_an_unjudged_candidate_bad() -> None:
    rng = random.Random(6)
    for _ in range(400):
        count = rng.randint(3, 30)
        names = names_of(count)
        first_bad = rng.randint(1, count - 1)
        infra = {i for i in range(1, count - 1) if rng.random() < 0.3}
        oracle = FakeOracle(names, first_bad, infra=infra)
        result = bisect(names, oracle)
        assert result.status in (Status.FOUND, Status.AMBIGUOUS)
        assert result.first_bad is not None and result.last_good is not None
        bad_index = names.index(result.first_bad)
        good_index = names.index(result.last_good)
        assert bad_index not in infra and good_index not in infra
        assert good_index < first_bad <= bad_index, (names, first_bad, infra, result.render())
        # Every suspect but the first bad one is a skipped candidate, and the truth is one.
        assert names[first_bad] in result.suspects
        assert all(names.index(s) in infra for s in result.suspects[:-1])
        assert (result.status is Status.FOUND) == (len(result.suspects) == 1)
        assert len(oracle.calls) == len(set(oracle.calls))


@pytest.mark.parametrize("how", ["returned", "raised"])
def test_config_error_aborts_at_once(how: str) -> None:
    names = names_of(10)
    calls: list[str] = []

    def oracle(name: str) -> Observation:
        calls.append(name)
        if name == names[-1]:
            if how == "raised":
                raise ConfigError("template init.sh.j2: undefined variable")
            return Observation(Outcome.CONFIG_ERROR, message="template error")
        return Observation(Outcome.PASS)

    result = bisect(names, oracle)
    assert calls == [names[0], names[-1]]
    assert result.status is Status.ABORTED
    assert result.status.exit_code == Outcome.CONFIG_ERROR.cli_exit
    assert result.first_bad is None


@pytest.mark.parametrize(
    ("first_bad", "role"), [(0, "good end"), (None, "bad end")], ids=["good-end-bad", "all-good"]
)
def test_ends_that_disagree_stop_before_the_middle(first_bad: int | None, role: str) -> None:
    names = names_of(7)
    oracle = FakeOracle(names, first_bad if first_bad is not None else len(names))
    result = bisect(names, oracle)
    assert result.status is Status.ENDS_DISAGREE
    assert role in result.message
    assert len(oracle.calls) <= 2


def test_an_end_with_an_infra_error_is_retried_then_untestable() -> None:
    names = names_of(5)
    oracle = FakeOracle(names, 3, infra=[0])
    result = bisect(names, oracle, end_retries=2)
    assert oracle.calls == [names[0]] * 3
    assert result.status is Status.UNTESTABLE_END
    assert result.status.exit_code == Outcome.INFRA_ERROR.cli_exit


def test_a_passing_retry_of_an_end_continues() -> None:
    names = names_of(5)
    flaky = {"left": 1}

    def oracle(name: str) -> Observation:
        if name == names[-1] and flaky["left"]:
            flaky["left"] -= 1
            raise InfraError("QMP never came up")
        return Observation(Outcome.TEST_FAIL if name >= names[2] else Outcome.PASS)

    result = bisect(names, oracle)
    assert result.status is Status.FOUND and result.first_bad == names[2]


def test_unknown_exceptions_are_harness_bugs_and_propagate() -> None:
    def oracle(name: str) -> Observation:
        raise KeyError(name)

    with pytest.raises(KeyError):
        bisect(names_of(3), oracle)


@pytest.mark.parametrize("names", [["only"], [], ["a", "b", "a"]])
def test_bad_candidate_lists_are_refused(names: list[str]) -> None:
    with pytest.raises(ValueError):
        bisect(names, FakeOracle(["a", "b"], 1))


def test_on_step_sees_each_step_as_taken() -> None:
    names = names_of(6)
    seen: list[str] = []
    result = bisect(names, FakeOracle(names, 2), on_step=lambda s: seen.append(s.render()))
    assert seen == [s.render() for s in result.steps]
    assert all(("booted" in line) for line in seen)
    assert "verdicts:    4 (0 from the cache)" in result.render()


def test_a_skipped_step_reads_as_an_attempt_not_a_boot() -> None:
    names = names_of(6)
    result = bisect(names, FakeOracle(names, 4, infra=[2]))
    step = result.step_of(names[2])
    assert step is not None
    assert "INFRA_ERROR -> skip" in step.render() and "attempted" in step.render()


# --- the verdict cache ---------------------------------------------------------------


def test_verdicts_round_trip_and_only_verdicts_on_the_guest_are_stored(tmp_path: Path) -> None:
    verdicts = VerdictCache(tmp_path)
    for outcome in Outcome:
        key = verdict_key("kernel", "initramfs", outcome.name)
        stored = verdicts.put(key, outcome, kernel="k", log_path=tmp_path / "c.log", seconds=2.5)
        hit = verdicts.get(key)
        assert stored == (outcome in CACHEABLE)
        if outcome in CACHEABLE:
            assert hit is not None
            assert (hit.outcome, hit.kernel, hit.log_path) == (outcome, "k", tmp_path / "c.log")
        else:
            assert hit is None
    assert Outcome.INFRA_ERROR not in CACHEABLE and Outcome.CONFIG_ERROR not in CACHEABLE


def test_verdict_key_changes_with_each_part() -> None:
    parts = ["kernel", "initramfs", "oracle"]
    keys = {verdict_key(*parts)}
    for i in range(3):
        changed = list(parts)
        changed[i] += "!"
        keys.add(verdict_key(changed[0], changed[1], changed[2]))
    assert len(keys) == 4
    assert verdict_key(*parts) in keys
    assert verdict_key("ke", "rnel", "x") != verdict_key("k", "ernel", "x")


def test_a_damaged_verdict_is_a_miss(tmp_path: Path) -> None:
    verdicts = VerdictCache(tmp_path)
    key = verdict_key("a", "b", "c")
    verdicts.put(key, Outcome.PASS)
    path = next(tmp_path.rglob("*.json"))
    path.write_text("{not json")
    assert verdicts.get(key) is None
    path.write_text('{"format": 1, "outcome": "INFRA_ERROR"}')  # never stored; never trusted
    assert verdicts.get(key) is None


# --- pytest's exit codes and junit ---------------------------------------------------


def junit(tmp_path: Path, cases: str) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text(f'<testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


def test_pytest_exit_codes_map_to_outcomes(tmp_path: Path) -> None:
    empty = tmp_path / "missing.xml"
    assert pytest_outcome(0, empty)[0] is Outcome.PASS
    assert pytest_outcome(1, empty)[0] is Outcome.TEST_FAIL
    for code in (2, 3, 4, 5):
        assert pytest_outcome(code, empty)[0] is Outcome.CONFIG_ERROR
        assert str(code) in pytest_outcome(code, empty)[1]
    assert pytest_outcome(-9, empty)[0] is Outcome.INFRA_ERROR


def test_junit_outcome_properties_win(tmp_path: Path) -> None:
    path = junit(
        tmp_path,
        '<testcase name="a"><properties><property name="outcome" value="INFRA_ERROR"/>'
        '</properties><error message="INFRA_ERROR: QEMU would not start"/></testcase>',
    )
    assert pytest_outcome(1, path)[0] is Outcome.INFRA_ERROR
    assert Verdict.of(pytest_outcome(1, path)[0]) is Verdict.SKIP


def test_junit_without_properties(tmp_path: Path) -> None:
    cases = {
        '<testcase name="f"><failure message="assert 1 == 2"/></testcase>': Outcome.TEST_FAIL,
        '<testcase name="k"><failure message="KERNEL_FAULT: panic"/></testcase>': (
            Outcome.KERNEL_FAULT
        ),
        '<testcase name="e"><error message="fixture crashed"/></testcase>': Outcome.CONFIG_ERROR,
        '<testcase name="s"><skipped message="not for this kernel"/></testcase>': (
            Outcome.INFRA_ERROR
        ),
        '<testcase name="p"/>': Outcome.PASS,
        '<testcase name="i"><error message=\'failed on setup with "INFRA_ERROR: no QEMU"\'/>'
        "</testcase>": Outcome.INFRA_ERROR,
    }
    for xml, expected in cases.items():
        outcomes, reasons = junit_outcomes(junit(tmp_path, xml))
        assert outcomes == [expected]
        assert bool(reasons) == (expected is not Outcome.PASS)
    both = junit(tmp_path, "".join(cases))
    assert pytest_outcome(1, both)[0] is worst(list(cases.values())) is Outcome.CONFIG_ERROR


# --- the command line, without booting -------------------------------------------------


@pytest.fixture
def catalogue_file(tmp_path: Path) -> Path:
    from tests.unit.test_cli import fake_bzimage

    text = ['default = "v1"']
    for i in range(1, 6):
        fake_bzimage(tmp_path / f"bz{i}", f"6.1.{i}")
        tags = '["odd"]' if i % 2 else '["even"]'
        text.append(f'[kernels."v{i}"]\nvmlinuz = "bz{i}"\ntags = {tags}')
    path = tmp_path / "kernels.toml"
    path.write_text("\n".join(text) + "\n")
    return path


def test_candidates_are_the_file_order_between_the_ends(catalogue_file: Path) -> None:
    catalogue = load_catalogue(catalogue_file)
    assert bisect_candidates(catalogue, "v2", "v4", None) == ["v2", "v3", "v4"]
    assert bisect_candidates(catalogue, None, None, "v5,even,v1") == ["v5", "v2", "v4", "v1"]
    assert bisect_candidates(catalogue, "v2", None, "odd,v2,v4") == ["v2", "v4"]


@pytest.mark.parametrize(
    ("good", "bad", "explicit", "message"),
    [
        ("v4", "v2", None, "comes before"),
        ("v1", "v9", None, "no kernel named 'v9'"),
        (None, "v2", None, "--good NAME and --bad NAME"),
        ("v2", None, "v1,v3", "not in --kernels-list"),
    ],
)
def test_bad_candidate_options_are_config_errors(
    catalogue_file: Path, good: str | None, bad: str | None, explicit: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        bisect_candidates(load_catalogue(catalogue_file), good, bad, explicit)


def run_step(argv: list[str]) -> int:
    return cli.main(["bisect-step", *argv])


def test_step_usage_errors_abort_instead_of_meaning_bad(catalogue_file: Path) -> None:
    for argv in (["--bogus", "--", "boot"], ["--", "reboot"], [], ["--", "boot", "--nope"]):
        assert run_step(["--kernels", str(catalogue_file), *argv]) == STEP_ABORT, argv
    assert run_step(["--", "pytest", "--kernel", "v1"]) == STEP_ABORT
    assert STEP_ABORT >= 128


def test_step_failed_build_is_a_skip(tmp_path: Path) -> None:
    marker = tmp_path / "built"
    code = run_step(["--build", f"touch {marker}; exit 3", "--", "boot", "-k", "v1"])
    assert code == STEP_SKIP == Outcome.INFRA_ERROR.bisect_code
    assert marker.exists(), "the build command ran"


def test_step_harness_bug_aborts_with_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.cli import bisect as cli_bisect

    def broken(args: object) -> int:
        raise RuntimeError("bug")

    monkeypatch.setattr(cli_bisect, "_bisect_step", broken)
    assert run_step(["--", "boot"]) == STEP_BUG
    assert "RuntimeError: bug" in capsys.readouterr().err


def test_step_config_error_from_the_catalogue_aborts(tmp_path: Path) -> None:
    assert run_step(["--kernels", str(tmp_path / "no-such.toml"), "--", "boot"]) == STEP_ABORT
