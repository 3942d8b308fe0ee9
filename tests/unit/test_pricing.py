"""Pricing against the contract of SPEC §2, using the price table shipped in the repository.

Expected costs are computed here from the SPEC §2 table, transcribed below as the decimal strings
the SPEC prints (USD per MTok), never from the code's own output: one token at $X/MTok costs
X * 1000 nano-USD, and a request costs sum(tokens_k * rate_k).
"""

from __future__ import annotations

import copy
import tomllib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import DeadLetterReason, NoPriceError, UnknownModelError
from core.pricing import PriceTable, default_price_table_path
from core.usage import Price, TokenUsage

# -- SPEC §2, transcribed --------------------------------------------------------------------

# family id -> (display name, standard (input, output, cache write, cache read),
#               long-context rates or None), USD per MTok.
SPEC_FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...] | None]] = {
    "opus-4.1": ("Claude Opus 4.1", ("15", "75", "18.75", "1.50"), None),
    "opus-4": ("Claude Opus 4", ("15", "75", "18.75", "1.50"), None),
    "sonnet-4": ("Claude Sonnet 4", ("3", "15", "3.75", "0.30"), ("6", "22.50", "7.50", "0.60")),
    "sonnet-3.7": ("Claude Sonnet 3.7", ("3", "15", "3.75", "0.30"), None),
    "opus-3": ("Claude Opus 3", ("15", "75", "18.75", "1.50"), None),
    "haiku-3.5": ("Claude Haiku 3.5", ("0.80", "4", "1", "0.08"), None),
}
SPEC_LONG_CONTEXT_THRESHOLD = 200_000
SPEC_ALIASES: dict[str, str] = {
    "claude-sonnet-4-20250514": "sonnet-4",
    "claude-sonnet-4-0": "sonnet-4",
    "claude-sonnet-4": "sonnet-4",
    "claude-opus-4-1-20250805": "opus-4.1",
    "claude-opus-4-1": "opus-4.1",
    "claude-opus-4-20250514": "opus-4",
    "claude-opus-4-0": "opus-4",
    "claude-3-7-sonnet-20250219": "sonnet-3.7",
    "claude-3-7-sonnet-latest": "sonnet-3.7",
    "claude-3-opus-20240229": "opus-3",
    "claude-3-opus-latest": "opus-3",
    "claude-3-5-haiku-20241022": "haiku-3.5",
    "claude-3-5-haiku-latest": "haiku-3.5",
}
FIRST_VERSION_ID = "2025-01-01"
FIRST_EFFECTIVE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
JUNE_2025_MS = 1_748_736_000_000  # 2025-06-01T00:00:00Z
KINDS = ("input", "output", "cache_write", "cache_read")


def nano_per_token(usd_per_mtok: str) -> int:
    """SPEC §2: one token at $X/MTok costs X * 1000 nano-USD, a whole number by contract."""
    nano = Decimal(usd_per_mtok) * 1000
    assert nano == nano.to_integral_value(), usd_per_mtok
    return int(nano)


def spec_cost(family: str, usage: TokenUsage, *, long_context: bool) -> int:
    _, standard, long_rates = SPEC_FAMILIES[family]
    rates = long_rates if long_context else standard
    assert rates is not None
    tokens = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_creation_input_tokens,
        usage.cache_read_input_tokens,
    )
    return sum(count * nano_per_token(rate) for count, rate in zip(tokens, rates, strict=True))


def spec_price(model: str, usage: TokenUsage) -> tuple[str, bool, int]:
    """(family, long_context, cost) for a request under the first SPEC version."""
    family = SPEC_ALIASES[model]
    prompt = usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
    has_tier = SPEC_FAMILIES[family][2] is not None
    long_context = has_tier and prompt > SPEC_LONG_CONTEXT_THRESHOLD
    return family, long_context, spec_cost(family, usage, long_context=long_context)


def one_token(kind: str) -> TokenUsage:
    return TokenUsage(*(1 if name == kind else 0 for name in KINDS))


TABLE = PriceTable.load(default_price_table_path())
NON_TIERED_ALIASES = sorted(m for m, f in SPEC_ALIASES.items() if SPEC_FAMILIES[f][2] is None)


# -- the shipped table is the SPEC table -----------------------------------------------------


def test_shipped_families_and_display_names_are_the_spec_ones() -> None:
    (version,) = TABLE.versions
    assert version.version_id == FIRST_VERSION_ID
    assert version.effective_from_ms == FIRST_EFFECTIVE_MS
    assert {fid: f.display_name for fid, f in version.families.items()} == {
        fid: spec[0] for fid, spec in SPEC_FAMILIES.items()
    }


def test_shipped_aliases_are_exactly_the_spec_ones() -> None:
    assert dict(TABLE.versions[0].aliases) == SPEC_ALIASES


def test_only_sonnet_4_has_a_long_context_tier_above_200k() -> None:
    families = TABLE.versions[0].families
    assert families["sonnet-4"].long_context_threshold == SPEC_LONG_CONTEXT_THRESHOLD
    assert [fid for fid, f in families.items() if f.long_context is not None] == ["sonnet-4"]


# -- every alias, every family, every token kind ---------------------------------------------


@pytest.mark.parametrize("model", sorted(SPEC_ALIASES))
def test_every_alias_prices_at_its_family_spec_rates(model: str) -> None:
    usage = TokenUsage(
        input_tokens=12_345,
        output_tokens=6_789,
        cache_creation_input_tokens=1_011,
        cache_read_input_tokens=150_000,
    )
    family = SPEC_ALIASES[model]
    assert TABLE.price(model, usage, JUNE_2025_MS) == Price(
        model_family=family,
        pricing_version=FIRST_VERSION_ID,
        long_context=False,
        cost_nano=spec_cost(family, usage, long_context=False),
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", sorted(SPEC_FAMILIES))
def test_one_token_of_each_kind_costs_its_spec_rate_times_1000(family: str, kind: str) -> None:
    model = next(m for m, f in SPEC_ALIASES.items() if f == family)
    expected = nano_per_token(SPEC_FAMILIES[family][1][KINDS.index(kind)])
    assert TABLE.price(model, one_token(kind), JUNE_2025_MS).cost_nano == expected


def test_one_haiku_cache_read_token_costs_exactly_80_nano_usd() -> None:
    price = TABLE.price("claude-3-5-haiku-20241022", one_token("cache_read"), JUNE_2025_MS)
    assert price.cost_nano == 80
    assert type(price.cost_nano) is int


def test_one_sonnet_4_long_context_output_token_costs_exactly_22500_nano_usd() -> None:
    prompt_only = TokenUsage(200_001, 0, 0, 0)
    with_output = TokenUsage(200_001, 1, 0, 0)
    without = TABLE.price("claude-sonnet-4", prompt_only, JUNE_2025_MS)
    with_one = TABLE.price("claude-sonnet-4", with_output, JUNE_2025_MS)
    assert without.long_context and with_one.long_context
    assert with_one.cost_nano - without.cost_nano == 22_500
    assert with_one.cost_nano == 200_001 * 6_000 + 22_500


def test_a_large_request_is_exact_to_the_nano_usd() -> None:
    # 987,654,321 Opus output tokens at $75/MTok = $74,074.074075 exactly.
    usage = TokenUsage(0, 987_654_321, 0, 0)
    cost = TABLE.price("claude-opus-4-1", usage, JUNE_2025_MS).cost_nano
    assert cost == 74_074_074_075_000
    assert Decimal(cost) / 10**9 == Decimal("74074.074075")


# -- the long-context tier -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "long_context"),
    [
        (TokenUsage(200_000, 0, 0, 0), False),
        (TokenUsage(200_001, 0, 0, 0), True),
        (TokenUsage(100_000, 0, 0, 100_000), False),
        (TokenUsage(100_000, 0, 0, 100_001), True),
        (TokenUsage(100_000, 0, 100_001, 0), True),
        (TokenUsage(0, 0, 200_000, 0), False),
        (TokenUsage(0, 0, 100_000, 100_001), True),
        (TokenUsage(1, 0, 100_000, 100_000), True),
        # Output tokens are not part of the prompt.
        (TokenUsage(200_000, 1_000_000, 0, 0), False),
        (TokenUsage(100_000, 7_000, 0, 100_000), False),
    ],
)
def test_sonnet_4_long_context_starts_above_200k_prompt_tokens(
    usage: TokenUsage, long_context: bool
) -> None:
    price = TABLE.price("claude-sonnet-4-20250514", usage, JUNE_2025_MS)
    assert price.long_context is long_context
    assert price.cost_nano == spec_cost("sonnet-4", usage, long_context=long_context)


def test_cache_tokens_push_a_request_into_long_context_and_all_kinds_reprice() -> None:
    usage = TokenUsage(
        input_tokens=100_000,
        output_tokens=5_000,
        cache_creation_input_tokens=0,
        cache_read_input_tokens=100_001,
    )
    price = TABLE.price("claude-sonnet-4-0", usage, JUNE_2025_MS)
    assert price.long_context
    # All four kinds at the long-context rates: $6, $22.50, $7.50, $0.60 per MTok.
    assert price.cost_nano == 100_000 * 6_000 + 5_000 * 22_500 + 100_001 * 600


@pytest.mark.parametrize("model", NON_TIERED_ALIASES)
def test_a_model_without_a_tier_stays_standard_above_200k(model: str) -> None:
    usage = TokenUsage(150_000, 10_000, 100_000, 250_000)
    price = TABLE.price(model, usage, JUNE_2025_MS)
    assert not price.long_context
    assert price.cost_nano == spec_cost(SPEC_ALIASES[model], usage, long_context=False)


# -- dates and versions ----------------------------------------------------------------------


@pytest.mark.parametrize("occurred_at_ms", [FIRST_EFFECTIVE_MS - 1, 0, -1, 1_704_067_200_000])
def test_an_event_before_the_first_version_has_no_price(occurred_at_ms: int) -> None:
    with pytest.raises(NoPriceError) as info:
        TABLE.price("claude-sonnet-4", TokenUsage(1, 1, 1, 1), occurred_at_ms)
    assert info.value.reason is DeadLetterReason.NO_PRICE
    assert str(occurred_at_ms) in info.value.detail


def test_an_event_exactly_at_the_first_version_is_priced() -> None:
    price = TABLE.price("claude-sonnet-4", TokenUsage(1, 1, 1, 1), FIRST_EFFECTIVE_MS)
    assert price.pricing_version == FIRST_VERSION_ID
    assert price.cost_nano == 3_000 + 15_000 + 3_750 + 300


def _two_version_table() -> PriceTable:
    """The shipped version plus a later one made the operator's way: copy the whole version,
    change what changed. Sonnet 4 input goes to $4/MTok and Opus 3 is retired."""
    raw = tomllib.loads(default_price_table_path().read_text(encoding="utf-8"))
    second = copy.deepcopy(raw["versions"][0])
    second["id"] = "2025-09-01"
    second["effective_from"] = "2025-09-01T00:00:00Z"
    second["families"]["sonnet-4"]["input"] = "4"
    del second["families"]["opus-3"]
    for model in ("claude-3-opus-20240229", "claude-3-opus-latest"):
        del second["aliases"][model]
    raw["versions"].append(second)
    return PriceTable.from_mapping(raw)


SEPT_2025_MS = 1_756_684_800_000  # 2025-09-01T00:00:00Z


def test_an_event_at_a_version_boundary_uses_the_new_version() -> None:
    table = _two_version_table()
    usage = TokenUsage(1_000, 0, 0, 0)
    at = table.price("claude-sonnet-4", usage, SEPT_2025_MS)
    assert (at.pricing_version, at.cost_nano) == ("2025-09-01", 1_000 * 4_000)
    before = table.price("claude-sonnet-4", usage, SEPT_2025_MS - 1)
    assert (before.pricing_version, before.cost_nano) == ("2025-01-01", 1_000 * 3_000)


def test_a_retired_model_is_priced_before_and_unknown_after() -> None:
    table = _two_version_table()
    usage = TokenUsage(10, 10, 0, 0)
    before = table.price("claude-3-opus-latest", usage, SEPT_2025_MS - 1)
    assert before.model_family == "opus-3"
    assert before.cost_nano == 10 * 15_000 + 10 * 75_000
    with pytest.raises(UnknownModelError) as info:
        table.price("claude-3-opus-latest", usage, SEPT_2025_MS)
    assert info.value.reason is DeadLetterReason.UNKNOWN_MODEL
    assert "2025-09-01" in info.value.detail


def test_versions_are_listed_oldest_first() -> None:
    table = _two_version_table()
    assert table.version_ids == ("2025-01-01", "2025-09-01")
    assert [v.effective_from_ms for v in table.versions] == [FIRST_EFFECTIVE_MS, SEPT_2025_MS]


@given(
    st.lists(
        st.integers(min_value=FIRST_EFFECTIVE_MS - 10, max_value=SEPT_2025_MS + 10)
        | st.sampled_from([FIRST_EFFECTIVE_MS, SEPT_2025_MS, SEPT_2025_MS - 1, 2**62]),
        max_size=30,
    )
)
def test_version_lookup_agrees_with_a_scan_in_any_order(instants: list[int]) -> None:
    # The lookup remembers its last hit; no sequence of queries may make it answer stale.
    table = _two_version_table()
    for instant in instants:
        eligible = [v for v in table.versions if v.effective_from_ms <= instant]
        if not eligible:
            with pytest.raises(NoPriceError):
                table.version_at(instant)
        else:
            assert table.version_at(instant) is eligible[-1]


# -- unknown models --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    ["claude-sonnet-5", "sonnet-4", "Claude Sonnet 4", "CLAUDE-SONNET-4", "claude-sonnet-4 ", ""],
)
def test_an_unknown_model_is_a_dead_letter_not_a_zero_price(model: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        TABLE.price(model, TokenUsage(1, 1, 1, 1), JUNE_2025_MS)
    assert info.value.reason is DeadLetterReason.UNKNOWN_MODEL
    assert info.value.model == model


# -- properties ------------------------------------------------------------------------------

TOKENS = st.integers(min_value=0, max_value=5_000_000)
INSTANTS = st.integers(min_value=FIRST_EFFECTIVE_MS, max_value=4_102_444_800_000)  # to 2100
MODELS = st.sampled_from(sorted(SPEC_ALIASES))
USAGES = st.builds(TokenUsage, TOKENS, TOKENS, TOKENS, TOKENS)


@st.composite
def same_tier_split(draw: st.DrawFn) -> tuple[TokenUsage, TokenUsage, TokenUsage]:
    """(a, b, a + b) where a, b and their sum are all on the same side of 200K prompt tokens."""
    if draw(st.booleans()):  # all standard: the whole prompt fits in 200K, so each part does
        whole_input = draw(st.integers(0, SPEC_LONG_CONTEXT_THRESHOLD))
        whole_write = draw(st.integers(0, SPEC_LONG_CONTEXT_THRESHOLD - whole_input))
        whole_read = draw(st.integers(0, SPEC_LONG_CONTEXT_THRESHOLD - whole_input - whole_write))
        whole = (whole_input, draw(TOKENS), whole_write, whole_read)
        a_counts = [draw(st.integers(0, count)) for count in whole]
        b_counts = [count - part for count, part in zip(whole, a_counts, strict=True)]
        a, b = TokenUsage(*a_counts), TokenUsage(*b_counts)
    else:  # all long: each part alone is above 200K, so the sum is too
        parts = []
        for _ in range(2):
            write = draw(st.integers(0, 300_000))
            read = draw(st.integers(0, 300_000))
            low = max(0, SPEC_LONG_CONTEXT_THRESHOLD + 1 - write - read)
            parts.append(
                TokenUsage(draw(st.integers(low, low + 500_000)), draw(TOKENS), write, read)
            )
        a, b = parts
    total = TokenUsage(
        a.input_tokens + b.input_tokens,
        a.output_tokens + b.output_tokens,
        a.cache_creation_input_tokens + b.cache_creation_input_tokens,
        a.cache_read_input_tokens + b.cache_read_input_tokens,
    )
    return a, b, total


@given(model=MODELS, split=same_tier_split(), occurred_at_ms=INSTANTS)
def test_cost_is_additive_over_token_splits_within_one_tier(
    model: str, split: tuple[TokenUsage, TokenUsage, TokenUsage], occurred_at_ms: int
) -> None:
    a, b, total = split
    price_a = TABLE.price(model, a, occurred_at_ms)
    price_b = TABLE.price(model, b, occurred_at_ms)
    price_total = TABLE.price(model, total, occurred_at_ms)
    assert price_a.long_context == price_b.long_context == price_total.long_context
    assert price_a.cost_nano + price_b.cost_nano == price_total.cost_nano


@given(model=MODELS, usage=USAGES, occurred_at_ms=INSTANTS)
def test_price_matches_the_spec_computation(
    model: str, usage: TokenUsage, occurred_at_ms: int
) -> None:
    family, long_context, cost = spec_price(model, usage)
    price = TABLE.price(model, usage, occurred_at_ms)
    assert price == Price(family, FIRST_VERSION_ID, long_context, cost)


@given(model=MODELS, usage=USAGES, occurred_at_ms=INSTANTS)
def test_cost_is_a_non_negative_int(model: str, usage: TokenUsage, occurred_at_ms: int) -> None:
    cost = TABLE.price(model, usage, occurred_at_ms).cost_nano
    assert type(cost) is int
    assert cost >= 0


@given(usage=USAGES, occurred_at_ms=INSTANTS)
def test_long_context_never_costs_less_than_standard(
    usage: TokenUsage, occurred_at_ms: int
) -> None:
    price = TABLE.price("claude-sonnet-4", usage, occurred_at_ms)
    standard = spec_cost("sonnet-4", usage, long_context=False)
    assert price.cost_nano >= standard
    if price.long_context:
        assert price.cost_nano > standard  # > 200K prompt tokens at a strictly higher rate


@given(
    model=st.text(max_size=40).filter(lambda model: model not in SPEC_ALIASES),
    usage=USAGES,
    occurred_at_ms=INSTANTS,
)
def test_an_unknown_model_never_prices(model: str, usage: TokenUsage, occurred_at_ms: int) -> None:
    with pytest.raises(UnknownModelError):
        TABLE.price(model, usage, occurred_at_ms)
