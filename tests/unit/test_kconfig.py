"""harness.kernel.kconfig: fragments parsed, merged as merge_config.sh does, lost options named."""

from __future__ import annotations

from harness.kernel import kconfig
from harness.kernel.catalogue import SHIPPED_FRAGMENTS, shipped_fragments

BASE = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_64BIT=y
# CONFIG_MODULES is not set
CONFIG_LOCALVERSION=""
CONFIG_HZ=250
"""


def test_parse_reads_set_unset_and_quoted_values() -> None:
    assert kconfig.parse(BASE) == {
        "CONFIG_64BIT": "y",
        "CONFIG_MODULES": "n",
        "CONFIG_LOCALVERSION": '""',
        "CONFIG_HZ": "250",
    }


def test_a_later_line_wins() -> None:
    assert kconfig.parse("CONFIG_A=y\n# CONFIG_A is not set\n") == {"CONFIG_A": "n"}


def test_merge_moves_what_fragments_set_to_the_end_in_their_order() -> None:
    merged = kconfig.merge(BASE, ["CONFIG_MODULES=y\nCONFIG_NEW=m\n", "# CONFIG_64BIT is not set"])
    lines = merged.splitlines()
    assert lines[:3] == BASE.splitlines()[:3]  # comments kept
    assert lines[-3:] == ["CONFIG_MODULES=y", "CONFIG_NEW=m", "# CONFIG_64BIT is not set"]
    assert "# CONFIG_MODULES is not set" not in lines and "CONFIG_64BIT=y" not in lines
    assert kconfig.parse(merged)["CONFIG_HZ"] == "250"


def test_a_choice_member_a_fragment_sets_comes_after_the_bases() -> None:
    tiny = "# CONFIG_SLUB is not set\nCONFIG_SLOB=y\n"
    lines = kconfig.merge(tiny, ["CONFIG_SLUB=y\n"]).splitlines()
    assert lines.index("CONFIG_SLUB=y") > lines.index("CONFIG_SLOB=y")


def test_lost_options_names_each_option_its_fragment_and_what_it_became() -> None:
    final = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n"
    requested = {
        "minimal": kconfig.parse("CONFIG_A=y\nCONFIG_B=m\n"),
        "extra.config": kconfig.parse("CONFIG_C=y\nCONFIG_NOSUCH=y\n# CONFIG_D is not set\n"),
    }
    lost = kconfig.lost_options(requested, final)
    assert [(x.option, x.wanted, x.got, x.fragment) for x in lost] == [
        ("CONFIG_B", "m", "y", "minimal"),
        ("CONFIG_C", "y", "n", "extra.config"),
        ("CONFIG_NOSUCH", "y", "n", "extra.config"),
    ]
    assert lost[2].render() == "CONFIG_NOSUCH=y (from extra.config) ended up n"


def test_a_later_fragment_overrides_an_earlier_request() -> None:
    requested = {"a": {"CONFIG_X": "y"}, "b": {"CONFIG_X": "n"}}
    assert kconfig.lost_options(requested, "# CONFIG_X is not set\n") == []


def test_shipped_fragments_are_valid_fragments() -> None:
    assert {"minimal", "debug", "warnings"} <= set(shipped_fragments())
    for name in shipped_fragments():
        text = (SHIPPED_FRAGMENTS / f"{name}.config").read_text()
        options = kconfig.parse(text)
        assert options, name
        for line in text.splitlines():
            assert not line.strip() or line.startswith("#") or line.startswith("CONFIG_"), line
    minimal = kconfig.parse((SHIPPED_FRAGMENTS / "minimal.config").read_text())
    # What the legacy-initrd and NFS-root scenarios need built in, and the storage drivers
    # as modules (the tests load them from the initramfs).
    for option in ("CONFIG_BLK_DEV_RAM", "CONFIG_ROOT_NFS", "CONFIG_IP_PNP", "CONFIG_PVH"):
        assert minimal[option] == "y", option
    for option in ("CONFIG_ATA_PIIX", "CONFIG_SATA_AHCI", "CONFIG_BLK_DEV_NVME", "CONFIG_LKDTM"):
        assert minimal[option] == "m", option
