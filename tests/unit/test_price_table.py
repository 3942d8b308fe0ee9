"""The price table file format and its loader: what an operator may write, and what is refused.

Every refusal must be a :class:`PriceTableError` whose single line names the culprit (version,
family, field), because that line is all an operator sees when a worker refuses to start.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError, PriceTableError
from core.pricing import (
    FamilyPrice,
    PriceTable,
    PriceVersion,
    Rates,
    default_price_table_path,
)
from core.usage import TokenUsage

JAN_1_2025_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
SOURCE = "price table test.toml"


def _version(version_id: str = "v1", effective_from: Any = "2025-01-01T00:00:00Z") -> dict:
    """A small valid version: Sonnet 4 with its long-context tier, and Haiku 3.5."""
    return {
        "id": version_id,
        "effective_from": effective_from,
        "families": {
            "sonnet-4": {
                "display_name": "Claude Sonnet 4",
                "input": "3",
                "output": "15",
                "cache_write": "3.75",
                "cache_read": "0.30",
                "long_context": {
                    "threshold_tokens": 200_000,
                    "input": "6",
                    "output": "22.50",
                    "cache_write": "7.50",
                    "cache_read": "0.60",
                },
            },
            "haiku-3.5": {
                "display_name": "Claude Haiku 3.5",
                "input": "0.80",
                "output": "4",
                "cache_write": "1",
                "cache_read": "0.08",
            },
        },
        "aliases": {"claude-sonnet-4": "sonnet-4", "claude-3-5-haiku-latest": "haiku-3.5"},
    }


def _table(*versions: dict) -> dict:
    return {"versions": list(versions) or [_version()]}


def _rejected(data: Any) -> str:
    """Load ``data``, expect a refusal, and return its message after checking it is one line."""
    with pytest.raises(PriceTableError) as info:
        PriceTable.from_mapping(data, source=SOURCE)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{SOURCE}: ")
    return message


def _assert_names(message: str, *fragments: str) -> None:
    missing = [fragment for fragment in fragments if fragment not in message]
    assert not missing, f"{missing} not in {message!r}"


def _sonnet(data: dict) -> dict:
    return data["versions"][0]["families"]["sonnet-4"]


# -- the shipped file ------------------------------------------------------------------------


def test_default_path_is_the_repository_data_file() -> None:
    path = default_price_table_path()
    assert path.parts[-2:] == ("data", "price_table.toml")
    assert (path.parent.parent / "core" / "pricing.py").is_file()
    assert path.is_file()


def test_shipped_table_loads_with_one_version_from_2025() -> None:
    table = PriceTable.load(default_price_table_path())
    assert table.version_ids == ("2025-01-01",)
    (version,) = table.versions
    assert version.effective_from_ms == JAN_1_2025_MS
    assert version.effective_from == datetime(2025, 1, 1, tzinfo=UTC)
    assert table.version_by_id("2025-01-01") is version


def test_shipped_rates_are_written_as_quoted_decimal_strings() -> None:
    # A TOML float would be rejected anyway; this pins the file's style for the next editor.
    raw = tomllib.loads(default_price_table_path().read_text(encoding="utf-8"))
    for version in raw["versions"]:
        assert isinstance(version["effective_from"], str)
        for family in version["families"].values():
            for tier in (family, family.get("long_context", {})):
                for name in ("input", "output", "cache_write", "cache_read"):
                    if name in tier:
                        assert isinstance(tier[name], str)


# -- accepted input --------------------------------------------------------------------------


def test_rates_convert_exactly_to_nano_usd_per_token() -> None:
    table = PriceTable.from_mapping(_table())
    sonnet = table.versions[0].families["sonnet-4"]
    assert sonnet.standard == Rates(input=3000, output=15000, cache_write=3750, cache_read=300)
    assert sonnet.long_context == Rates(6000, 22500, 7500, 600)
    assert sonnet.long_context_threshold == 200_000
    haiku = table.versions[0].families["haiku-3.5"]
    assert haiku.standard == Rates(800, 4000, 1000, 80)
    assert haiku.long_context is None
    assert haiku.long_context_threshold is None


@pytest.mark.parametrize(
    ("written", "nano"),
    [
        ("0.001", 1),
        ("0.0010", 1),
        ("0.08000000", 80),
        ("0", 0),
        ("+1", 1000),
        ("18.75", 18750),
        ("123456789012345678901234567890.125", 123456789012345678901234567890125),
    ],
)
def test_any_whole_nano_rate_is_accepted(written: str, nano: int) -> None:
    data = _table()
    data["versions"][0]["families"]["haiku-3.5"]["cache_read"] = written
    table = PriceTable.from_mapping(data)
    assert table.versions[0].families["haiku-3.5"].standard.cache_read == nano


@pytest.mark.parametrize(
    ("written", "epoch_ms"),
    [
        ("2025-01-01T00:00:00Z", JAN_1_2025_MS),
        ("2025-01-01T00:00:00+00:00", JAN_1_2025_MS),
        ("2025-01-01t00:00:00z", JAN_1_2025_MS),
        ("2025-01-01T00:00:00.000Z", JAN_1_2025_MS),
        ("2025-01-01T00:00:00.5Z", JAN_1_2025_MS + 500),
        ("2025-01-01T00:00:00.123000Z", JAN_1_2025_MS + 123),
        ("2025-03-01T12:30:00Z", 1_740_832_200_000),
        (datetime(2025, 1, 1, tzinfo=UTC), JAN_1_2025_MS),
    ],
)
def test_utc_instants_are_accepted(written: Any, epoch_ms: int) -> None:
    table = PriceTable.from_mapping(_table(_version(effective_from=written)))
    assert table.versions[0].effective_from_ms == epoch_ms


def test_versions_are_ordered_by_effective_from_whatever_the_file_order(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        """
[[versions]]
id = "later"
effective_from = "2025-06-01T00:00:00Z"
aliases = { "claude-haiku" = "haiku" }
[versions.families.haiku]
display_name = "Haiku"
input = "1"
output = "5"
cache_write = "1.25"
cache_read = "0.10"

[[versions]]
id = "earlier"
effective_from = 2025-01-01T00:00:00Z  # an unquoted TOML date-time in UTC is fine too
aliases = { "claude-haiku" = "haiku" }
[versions.families.haiku]
display_name = "Haiku"
input = "0.80"
output = "4"
cache_write = "1"
cache_read = "0.08"
""",
        encoding="utf-8",
    )
    table = PriceTable.load(path)
    assert table.version_ids == ("earlier", "later")
    assert [version.effective_from_ms for version in table.versions] == [
        JAN_1_2025_MS,
        1_748_736_000_000,
    ]
    assert "earlier" in repr(table)


def test_a_version_is_frozen_after_loading() -> None:
    version = PriceTable.from_mapping(_table()).versions[0]
    with pytest.raises(TypeError):
        version.aliases["claude-new"] = "sonnet-4"  # type: ignore[index]
    with pytest.raises(TypeError):
        version.families["x"] = version.families["sonnet-4"]  # type: ignore[index]


def test_versions_can_be_compared_and_hashed() -> None:
    first = PriceTable.from_mapping(_table()).versions[0]
    again = PriceTable.from_mapping(_table()).versions[0]
    assert first == again
    assert {first, again} == {first}


def test_an_unknown_version_id_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        PriceTable.from_mapping(_table()).version_by_id("nope")


# -- refusals: rates -------------------------------------------------------------------------


def test_a_rate_finer_than_a_nano_usd_per_token_is_refused() -> None:
    data = _table()
    _sonnet(data)["cache_read"] = "0.0005"
    message = _rejected(data)
    _assert_names(
        message, "version 'v1'", "family 'sonnet-4'", "'cache_read'", "'0.0005'", "nano-USD"
    )


def test_an_inexact_long_context_rate_is_refused() -> None:
    data = _table()
    _sonnet(data)["long_context"]["output"] = "22.5001"
    _assert_names(
        _rejected(data), "version 'v1'", "family 'sonnet-4'", "'long_context.output'", "22.5001"
    )


@pytest.mark.parametrize(
    "written", ["abc", "1e3", "NaN", "Infinity", " 3", "3 ", "3,5", "", "0x10", "1_000", "$3", "3."]
)
def test_a_rate_that_is_not_a_plain_decimal_is_refused(written: str) -> None:
    data = _table()
    _sonnet(data)["input"] = written
    _assert_names(
        _rejected(data), "version 'v1'", "family 'sonnet-4'", "'input'", "not a decimal number"
    )


@pytest.mark.parametrize("written", [3.75, 3, 0.3])
def test_a_toml_number_rate_is_refused_with_the_fix(written: float) -> None:
    data = _table()
    _sonnet(data)["cache_write"] = written
    _assert_names(_rejected(data), "family 'sonnet-4'", "'cache_write'", "quoted decimal string")


@pytest.mark.parametrize("written", [None, True, ["3"], {"usd": "3"}])
def test_a_rate_of_the_wrong_type_is_refused(written: object) -> None:
    data = _table()
    _sonnet(data)["output"] = written
    _assert_names(_rejected(data), "family 'sonnet-4'", "'output'", "decimal string")


@pytest.mark.parametrize("written", ["-0.30", "-1"])
def test_a_negative_rate_is_refused(written: str) -> None:
    data = _table()
    data["versions"][0]["families"]["haiku-3.5"]["cache_read"] = written
    _assert_names(_rejected(data), "version 'v1'", "family 'haiku-3.5'", "'cache_read'", "negative")


def test_a_long_context_rate_below_the_standard_one_is_refused() -> None:
    data = _table()
    _sonnet(data)["long_context"]["input"] = "2"
    _assert_names(
        _rejected(data), "version 'v1'", "family 'sonnet-4'", "'long_context.input'", "below"
    )


# -- refusals: long-context tier -------------------------------------------------------------


def test_a_long_context_tier_without_threshold_is_refused() -> None:
    data = _table()
    del _sonnet(data)["long_context"]["threshold_tokens"]
    _assert_names(
        _rejected(data), "version 'v1'", "family 'sonnet-4'", "'long_context.threshold_tokens'"
    )


@pytest.mark.parametrize("threshold", [0, -1, True, "200000", 200_000.5, None])
def test_a_threshold_that_is_not_a_positive_integer_is_refused(threshold: object) -> None:
    data = _table()
    _sonnet(data)["long_context"]["threshold_tokens"] = threshold
    _assert_names(
        _rejected(data), "family 'sonnet-4'", "'long_context.threshold_tokens'", "positive integer"
    )


def test_a_long_context_tier_missing_a_rate_is_refused() -> None:
    data = _table()
    del _sonnet(data)["long_context"]["cache_read"]
    _assert_names(
        _rejected(data), "family 'sonnet-4'", "'long_context'", "missing field 'cache_read'"
    )


# -- refusals: aliases -----------------------------------------------------------------------


def test_an_alias_to_an_unknown_family_is_refused() -> None:
    data = _table()
    data["versions"][0]["aliases"]["claude-sonnet-5"] = "sonnet-5"
    _assert_names(_rejected(data), "version 'v1'", "alias 'claude-sonnet-5'", "family 'sonnet-5'")


def test_an_alias_whose_target_is_not_a_string_is_refused() -> None:
    data = _table()
    data["versions"][0]["aliases"]["claude-x"] = 4
    _assert_names(_rejected(data), "version 'v1'", "alias 'claude-x'", "must be a string")


@pytest.mark.parametrize("field", ["families", "aliases"])
def test_a_version_with_no_families_or_no_aliases_is_refused(field: str) -> None:
    data = _table()
    data["versions"][0][field] = {}
    _assert_names(_rejected(data), "version 'v1'", f"'{field}'")


# -- refusals: versions ----------------------------------------------------------------------


def test_two_versions_with_one_effective_from_are_refused() -> None:
    data = _table(_version("v1"), _version("v2", effective_from="2025-01-01T00:00:00+00:00"))
    _assert_names(_rejected(data), "'v1'", "'v2'", "'effective_from'", "2025-01-01T00:00:00Z")


def test_two_versions_with_one_id_are_refused() -> None:
    data = _table(_version("v1"), _version("v1", effective_from="2025-02-01T00:00:00Z"))
    _assert_names(_rejected(data), "version 'v1'", "'id'", "two versions")


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("2025-01-01T01:00:00+01:00", "UTC"),
        ("2025-01-01T00:00:00-00:00", "UTC"),
        ("2025-01-01T00:00:00-05:00", "UTC"),
        ("2025-01-01T00:00:00", "RFC 3339"),
        ("2025-01-01", "RFC 3339"),
        ("2025-01-01 00:00:00Z", "RFC 3339"),
        ("yesterday", "RFC 3339"),
        ("", "RFC 3339"),
        ("2025-13-01T00:00:00Z", "not a valid instant"),
        ("2025-02-30T00:00:00Z", "not a valid instant"),
        ("2025-01-01T24:00:00Z", "not a valid instant"),
        ("2025-01-01T00:00:00.0001Z", "millisecond"),
        (JAN_1_2025_MS, "RFC 3339"),
        (datetime(2025, 1, 1), "no UTC offset"),  # naive on purpose
        (datetime(2025, 1, 1, tzinfo=timezone(timedelta(hours=1))), "not in UTC"),
        (datetime(2025, 1, 1, microsecond=1, tzinfo=UTC), "millisecond"),
    ],
)
def test_an_effective_from_that_is_not_a_utc_instant_is_refused(
    written: object, problem: str
) -> None:
    data = _table(_version(effective_from=written))
    _assert_names(_rejected(data), "version 'v1'", "'effective_from'", problem)


@pytest.mark.parametrize("data", [{}, {"versions": []}], ids=["no-key", "empty-array"])
def test_an_empty_table_is_refused(data: dict) -> None:
    _assert_names(_rejected(data), "empty table")


def test_versions_that_are_not_an_array_of_tables_are_refused() -> None:
    _assert_names(_rejected({"versions": {"id": "v1"}}), "'versions'", "array")
    _assert_names(_rejected({"versions": ["v1"]}), "version #1", "expected a table")


# -- refusals: missing and unknown fields ----------------------------------------------------

Mutation = Callable[[dict], None]


def _drop_version_field(key: str) -> Mutation:
    return lambda data: data["versions"][0].pop(key)


def _drop_family_field(key: str) -> Mutation:
    return lambda data: _sonnet(data).pop(key)


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (_drop_version_field("id"), ["version #1", "missing field 'id'"]),
        (_drop_version_field("effective_from"), ["version 'v1'", "missing field 'effective_from'"]),
        (_drop_version_field("families"), ["version 'v1'", "missing field 'families'"]),
        (_drop_version_field("aliases"), ["version 'v1'", "missing field 'aliases'"]),
        (_drop_family_field("display_name"), ["family 'sonnet-4'", "'display_name'"]),
        (_drop_family_field("input"), ["family 'sonnet-4'", "missing field 'input'"]),
        (_drop_family_field("output"), ["family 'sonnet-4'", "missing field 'output'"]),
        (_drop_family_field("cache_write"), ["family 'sonnet-4'", "missing field 'cache_write'"]),
        (_drop_family_field("cache_read"), ["family 'sonnet-4'", "missing field 'cache_read'"]),
    ],
)
def test_a_missing_field_is_refused_by_name(mutate: Mutation, fragments: list[str]) -> None:
    data = _table()
    mutate(data)
    _assert_names(_rejected(data), *fragments)


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (lambda data: data.update(version=[]), ["unknown field 'version'"]),
        (
            lambda data: data["versions"][0].update(effective_to="2026-01-01T00:00:00Z"),
            ["version 'v1'", "unknown field 'effective_to'"],
        ),
        (
            lambda data: _sonnet(data).update(cache_wirte="3.75"),
            ["version 'v1'", "family 'sonnet-4'", "unknown field 'cache_wirte'"],
        ),
        (
            lambda data: _sonnet(data)["long_context"].update(threshold=200_000),
            ["family 'sonnet-4'", "'long_context'", "unknown field 'threshold'"],
        ),
    ],
)
def test_an_unknown_field_is_refused_by_name(mutate: Mutation, fragments: list[str]) -> None:
    # A typo must not silently fall back to a default: it is named instead.
    data = _table()
    mutate(data)
    _assert_names(_rejected(data), *fragments)


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (lambda data: data["versions"][0].update(id=""), ["version #1", "'id'", "non-empty"]),
        (lambda data: data["versions"][0].update(id=7), ["version #1", "'id'", "non-empty"]),
        (
            lambda data: _sonnet(data).update(display_name=" "),
            ["family 'sonnet-4'", "'display_name'"],
        ),
        (
            lambda data: data["versions"][0]["families"].update({"opus-4": "expensive"}),
            ["family 'opus-4'", "expected a table"],
        ),
    ],
)
def test_a_malformed_field_is_refused_by_name(mutate: Mutation, fragments: list[str]) -> None:
    data = _table()
    mutate(data)
    _assert_names(_rejected(data), *fragments)


def test_the_caller_mapping_is_not_modified() -> None:
    data = _table()
    before = copy.deepcopy(data)
    PriceTable.from_mapping(data)
    assert data == before


# -- the file itself -------------------------------------------------------------------------


def test_a_missing_file_is_a_price_table_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(PriceTableError) as info:
        PriceTable.load(path)
    _assert_names(str(info.value), str(path), "cannot read")
    assert isinstance(info.value.__cause__, OSError)
    assert isinstance(info.value, ConfigError)


def test_a_toml_syntax_error_is_a_price_table_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[[versions]]\nid = "v1\n', encoding="utf-8")
    with pytest.raises(PriceTableError) as info:
        PriceTable.load(path)
    message = str(info.value)
    assert "\n" not in message
    _assert_names(message, str(path), "invalid TOML", "line 2")
    assert isinstance(info.value.__cause__, tomllib.TOMLDecodeError)


def test_a_file_that_is_not_utf8_is_a_price_table_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('id = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(PriceTableError, match="UTF-8"):
        PriceTable.load(path)


def test_an_empty_file_is_an_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(PriceTableError, match="empty table"):
        PriceTable.load(path)


def test_an_unquoted_float_rate_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "float.toml"
    path.write_text(
        """
[[versions]]
id = "v1"
effective_from = "2025-01-01T00:00:00Z"
aliases = { "claude-haiku" = "haiku" }
[versions.families.haiku]
display_name = "Haiku"
input = 0.80
output = "4"
cache_write = "1"
cache_read = "0.08"
""",
        encoding="utf-8",
    )
    with pytest.raises(PriceTableError) as info:
        PriceTable.load(path)
    _assert_names(str(info.value), str(path), "family 'haiku'", "'input'", "quoted")


def test_a_local_toml_datetime_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "local.toml"
    text = default_price_table_path().read_text(encoding="utf-8")
    path.write_text(
        text.replace(
            'effective_from = "2025-01-01T00:00:00Z"', "effective_from = 2025-01-01T00:00:00"
        ),
        encoding="utf-8",
    )
    with pytest.raises(PriceTableError) as info:
        PriceTable.load(path)
    _assert_names(str(info.value), "version '2025-01-01'", "'effective_from'", "no UTC offset")


# -- the value types enforce their own invariants --------------------------------------------


def test_rates_must_be_non_negative_integers() -> None:
    with pytest.raises(PriceTableError, match="'output'"):
        Rates(1, -1, 1, 1)
    with pytest.raises(PriceTableError, match="'input'"):
        Rates(1.5, 1, 1, 1)  # type: ignore[arg-type]


def test_a_family_tier_and_threshold_come_together() -> None:
    rates = Rates(1, 1, 1, 1)
    with pytest.raises(PriceTableError, match="threshold_tokens"):
        FamilyPrice("f", "F", rates, long_context=rates)
    with pytest.raises(PriceTableError, match="threshold_tokens"):
        FamilyPrice("f", "F", rates, long_context_threshold=10)


def test_a_version_built_in_code_checks_its_aliases() -> None:
    family = FamilyPrice("f", "F", Rates(1, 1, 1, 1))
    with pytest.raises(PriceTableError, match="alias 'm'"):
        PriceVersion("v", 0, {"f": family}, {"m": "g"})
    with pytest.raises(PriceTableError, match="different id"):
        PriceVersion("v", 0, {"g": family}, {"m": "g"})


def test_a_table_built_in_code_needs_a_version() -> None:
    with pytest.raises(PriceTableError, match="empty table"):
        PriceTable([])


def test_a_table_built_in_code_prices_like_a_loaded_one() -> None:
    family = FamilyPrice("f", "F", Rates(1, 2, 3, 4))
    table = PriceTable(
        [
            PriceVersion("new", 10, {"f": family}, {"m": "f"}),
            PriceVersion("old", 0, {"f": family}, {"m": "f"}),
        ]
    )
    assert table.version_ids == ("old", "new")
    assert table.price("m", TokenUsage(1, 1, 1, 1), 10).cost_nano == 10
