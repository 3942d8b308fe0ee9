"""Synthetic, realistic usage load for ``metering generate`` (SPEC §7).

:func:`generate` yields :class:`Generated` records: usage-event dicts with exactly the SPEC §3
field names (``occurred_at`` as epoch milliseconds), exact re-sends of earlier events, and bad
records each tagged with the dead-letter reason the worker must give. It is pure Python on a
seeded :class:`random.Random`: no Kafka, no clock. The CLI encodes and produces what it yields,
keyed by :attr:`Generated.key`.

The shape of the load:

* **Organisations** have Zipf-like sizes (a few large ones hold most members, many have a
  handful), a fixed plan (larger organisations lean Enterprise) and stable ids.
* **Members** have a fixed seat tier (a rare switch happens mid-stream and sticks) and a
  log-normal activity weight, so a minority of users make most requests. Each member leans
  towards Claude or Claude Code.
* **Requests** use the real model ids of SPEC §2 (Sonnet 4 most). Claude Code requests carry
  more output and far more cache reads. About ``long_context_fraction`` of Sonnet 4 requests
  have a prompt above 200,000 tokens; every other request stays at or below 200,000.
* **Time**: ``occurred_at`` follows the record index through ``[start_ms, end_ms]`` with a
  daily and weekly rhythm and a few seconds of jitter, so the stream is roughly in time order
  and never later than ``now_ms``.

Determinism: the same :class:`GeneratorConfig` and ``now_ms`` always yield the same stream.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

from core.errors import ConfigError, DeadLetterReason

__all__ = [
    "FIRST_PRICED_MS",
    "OUT_OF_RANGE_TOKENS",
    "UNKNOWN_SCHEMA_ID",
    "USAGE_SCHEMA_ID",
    "Generated",
    "GeneratedKind",
    "GeneratorConfig",
    "event_window",
    "generate",
]

FIRST_PRICED_MS = 1_735_689_600_000
"""2025-01-01T00:00:00Z: the first price version's ``effective_from`` (SPEC §2)."""

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
DEFAULT_WINDOW_MS = 3 * DAY_MS

LONG_CONTEXT_THRESHOLD = 200_000
"""A prompt above this many tokens is long context (SPEC §2); exactly this many is standard."""

OUT_OF_RANGE_TOKENS = 10**12
"""A token count far above the documented per-request maximum (100,000,000)."""

USAGE_SCHEMA_ID = 1
"""The pinned Confluent schema id of the usage-event schema (used for truncated bodies)."""

UNKNOWN_SCHEMA_ID = 9999
"""A schema id no registry or pinned table of this project knows."""

FUTURE_MARGIN_MS = 2 * HOUR_MS
"""Future-dated bad records are at least this far past ``now_ms`` (the worker allows 1 h), so
they stay future even if the worker consumes them a while after generation."""

GeneratedKind = Literal["event", "duplicate", "bad_event", "bad_bytes"]

UsageDict = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Generated:
    """One record to produce to ``usage.events``.

    * ``event``: a fresh, valid usage event (``event`` set, ``expected_reason`` None).
    * ``duplicate``: an exact re-send of an earlier ``event`` record (same dict content).
    * ``bad_event``: an encodable but invalid usage dict; ``expected_reason`` is the dead-letter
      reason the worker must give.
    * ``bad_bytes``: raw message bytes that are not a decodable usage event (``raw`` set,
      ``event`` None); ``expected_reason`` as for ``bad_event``.

    ``key`` is the message key: the event's ``org_id`` (an existing org's id for ``bad_bytes``).
    ``defect`` names what is wrong with a bad record, for messages and test diagnostics.
    """

    kind: GeneratedKind
    event: UsageDict | None
    raw: bytes | None
    key: str
    expected_reason: DeadLetterReason | None
    defect: str | None = None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_fraction(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0.0 <= float(value) <= 1.0  # also rejects NaN
    )


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. Validated on construction.

    ``events`` is the total number of records :func:`generate` yields, duplicates and bad
    records included. ``users`` is the number of members across all ``orgs``. ``start_ms`` /
    ``end_ms`` bound the ``occurred_at`` of valid events (epoch ms); unset, they are the three
    days up to ``now_ms`` (never before 2025-01-01). ``duplicate_fraction`` and ``bad_fraction``
    are fractions of all records; ``extra_usage_fraction`` of valid events;
    ``long_context_fraction`` of Sonnet 4 requests; ``tier_change_fraction`` is the chance that a
    request comes from a member who has just switched seat tier.

    Raises :class:`core.errors.ConfigError` (one line listing every problem) when a value is
    out of range.
    """

    events: int
    orgs: int = 50
    users: int = 2000
    seed: int = 1
    start_ms: int | None = None
    end_ms: int | None = None
    duplicate_fraction: float = 0.01
    bad_fraction: float = 0.005
    extra_usage_fraction: float = 0.3
    long_context_fraction: float = 0.03
    tier_change_fraction: float = 0.0002

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _is_int(self.events) or self.events < 1:
            problems.append(f"events must be a whole number >= 1 (got {self.events!r})")
        if not _is_int(self.orgs) or self.orgs < 1:
            problems.append(f"orgs must be a whole number >= 1 (got {self.orgs!r})")
        if not _is_int(self.users):
            problems.append(f"users must be a whole number (got {self.users!r})")
        elif _is_int(self.orgs) and self.users < self.orgs:
            problems.append(
                f"users ({self.users}) must be >= orgs ({self.orgs}): every org needs a member"
            )
        if not _is_int(self.seed):
            problems.append(f"seed must be a whole number (got {self.seed!r})")
        for name in (
            "duplicate_fraction",
            "bad_fraction",
            "extra_usage_fraction",
            "long_context_fraction",
            "tier_change_fraction",
        ):
            value = getattr(self, name)
            if not _is_fraction(value):
                problems.append(f"{name} must be between 0 and 1 (got {value!r})")
        if (
            _is_fraction(self.duplicate_fraction)
            and _is_fraction(self.bad_fraction)
            and self.duplicate_fraction + self.bad_fraction > 1.0
        ):
            problems.append("duplicate_fraction + bad_fraction must not exceed 1")
        for name in ("start_ms", "end_ms"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_int(value):
                problems.append(f"{name} must be epoch milliseconds (got {value!r})")
            elif value < FIRST_PRICED_MS:
                problems.append(
                    f"{name} ({value}) precedes 2025-01-01T00:00:00Z, the first price version"
                )
        start_ms, end_ms = self.start_ms, self.end_ms
        if isinstance(start_ms, int) and isinstance(end_ms, int) and start_ms > end_ms:
            problems.append(f"start_ms ({self.start_ms}) is after end_ms ({self.end_ms})")
        if problems:
            raise ConfigError("invalid generator config: " + "; ".join(problems))


def event_window(config: GeneratorConfig, now_ms: int) -> tuple[int, int]:
    """The ``(start_ms, end_ms)`` range, inclusive, of valid events' ``occurred_at``.

    Raises :class:`ConfigError` when the range would reach past ``now_ms`` (generated usage is
    never in the future) or ``now_ms`` itself precedes 2025-01-01.
    """
    if not _is_int(now_ms) or now_ms < FIRST_PRICED_MS:
        raise ConfigError(f"now_ms ({now_ms!r}) must be epoch milliseconds on or after 2025-01-01")
    end_ms = now_ms if config.end_ms is None else config.end_ms
    if end_ms > now_ms:
        raise ConfigError(
            f"end_ms ({end_ms}) is after now ({now_ms}); generated usage is never in the future"
        )
    if config.start_ms is None:
        start_ms = max(FIRST_PRICED_MS, end_ms - DEFAULT_WINDOW_MS)
    else:
        start_ms = config.start_ms
    if start_ms > end_ms:
        raise ConfigError(f"start_ms ({start_ms}) is after end_ms ({end_ms})")
    return start_ms, end_ms


# --- reference data -------------------------------------------------------------------------

# Model ids of SPEC §2 per family, with relative weights (dated ids are what SDKs pin most).
_FAMILY_ALIASES: dict[str, tuple[tuple[str, int], ...]] = {
    "sonnet-4": (
        ("claude-sonnet-4-20250514", 6),
        ("claude-sonnet-4-0", 2),
        ("claude-sonnet-4", 2),
    ),
    "opus-4.1": (("claude-opus-4-1-20250805", 7), ("claude-opus-4-1", 3)),
    "opus-4": (("claude-opus-4-20250514", 7), ("claude-opus-4-0", 3)),
    "sonnet-3.7": (("claude-3-7-sonnet-20250219", 6), ("claude-3-7-sonnet-latest", 4)),
    "opus-3": (("claude-3-opus-20240229", 6), ("claude-3-opus-latest", 4)),
    "haiku-3.5": (("claude-3-5-haiku-20241022", 6), ("claude-3-5-haiku-latest", 4)),
}

# Family mix per product, in percent. Claude Code leans on Sonnet 4 and Opus 4.1 and never
# offered Opus 3; chat keeps a visible share of Haiku and older models.
_FAMILY_WEIGHTS: dict[str, dict[str, int]] = {
    "CLAUDE": {
        "sonnet-4": 50,
        "opus-4.1": 10,
        "opus-4": 4,
        "sonnet-3.7": 12,
        "opus-3": 4,
        "haiku-3.5": 20,
    },
    "CLAUDE_CODE": {
        "sonnet-4": 62,
        "opus-4.1": 20,
        "opus-4": 5,
        "sonnet-3.7": 8,
        "opus-3": 0,
        "haiku-3.5": 5,
    },
}

UNKNOWN_MODELS: tuple[str, ...] = ("claude-5-imaginary", "claude-sonnet-9", "gpt-4o")


@dataclass(frozen=True, slots=True)
class _TokenProfile:
    """Log-normal token distributions (median, sigma) of one product; cache parts are optional."""

    input_median: float
    input_sigma: float
    input_max: int
    output_median: float
    output_sigma: float
    output_max: int
    cache_write_share: float
    cache_write_median: float
    cache_write_sigma: float
    cache_read_share: float
    cache_read_median: float
    cache_read_sigma: float


_PROFILES: dict[str, _TokenProfile] = {
    "CLAUDE": _TokenProfile(
        input_median=900,
        input_sigma=1.1,
        input_max=60_000,
        output_median=450,
        output_sigma=0.9,
        output_max=8_000,
        cache_write_share=0.35,
        cache_write_median=1_500,
        cache_write_sigma=1.0,
        cache_read_share=0.5,
        cache_read_median=4_000,
        cache_read_sigma=1.2,
    ),
    "CLAUDE_CODE": _TokenProfile(
        input_median=1_500,
        input_sigma=1.2,
        input_max=80_000,
        output_median=1_000,
        output_sigma=0.9,
        output_max=32_000,
        cache_write_share=0.7,
        cache_write_median=4_000,
        cache_write_sigma=1.0,
        cache_read_share=0.92,
        cache_read_median=30_000,
        cache_read_sigma=0.8,
    ),
}

_JITTER_MS = 10_000
"""Spread (±5 s) of ``occurred_at`` around the event's place in the stream."""

_UUID_CLEAR = ~((0xC000 << 48) | (0xF000 << 64)) & ((1 << 128) - 1)
_UUID_V4 = (0x8000 << 48) | (4 << 76)


def _uuid4(bits: int) -> str:
    """``str(uuid.UUID(int=bits, version=4))``, without building the UUID object (3x faster)."""
    digits = f"{(bits & _UUID_CLEAR) | _UUID_V4:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _hour_intensity(epoch_ms: int) -> float:
    """Relative request rate at an instant: busy in EU/US working hours, quiet at weekends."""
    hour = (epoch_ms // HOUR_MS) % 24
    weekday = (epoch_ms // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    if 13 <= hour <= 21:
        rate = 1.0
    elif 7 <= hour <= 12 or 22 <= hour <= 23:
        rate = 0.7
    else:
        rate = 0.35
    return rate * (0.45 if weekday >= 5 else 1.0)


class _Timeline:
    """Maps a quantile in [0, 1) to an instant of the window, following :func:`_hour_intensity`.

    The window is cut at hour boundaries; each piece weighs its length times its intensity.
    """

    def __init__(self, start_ms: int, end_ms: int) -> None:
        self.start_ms = start_ms
        self.end_ms = end_ms
        self._starts: list[int] = []
        self._before: list[float] = []  # traffic weight of the window before each piece
        self._cumulative: list[float] = []  # ... and up to the end of each piece
        self._ms_per_weight: list[float] = []
        total = 0.0
        piece_start = start_ms
        while piece_start < end_ms:
            piece_end = min(end_ms, (piece_start // HOUR_MS + 1) * HOUR_MS)
            intensity = _hour_intensity(piece_start)
            self._starts.append(piece_start)
            self._before.append(total)
            total += (piece_end - piece_start) * intensity
            self._cumulative.append(total)
            self._ms_per_weight.append(1.0 / intensity)
            piece_start = piece_end
        self._total = total
        self._pieces = len(self._starts)

    def at(self, quantile: float) -> int:
        """The instant below which ``quantile`` of the window's traffic falls."""
        target = quantile * self._total
        index = bisect.bisect_right(self._cumulative, target)
        if index >= self._pieces:
            return self.end_ms
        offset = (target - self._before[index]) * self._ms_per_weight[index]
        return self._starts[index] + int(offset)


def _org_sizes(orgs: int, users: int, exponent: float = 1.1) -> list[int]:
    """Members per org by rank: Zipf-like, at least one each, summing to ``users`` exactly."""
    weights = [1.0 / rank**exponent for rank in range(1, orgs + 1)]
    total = sum(weights)
    spare = users - orgs
    quotas = [spare * weight / total for weight in weights]
    sizes = [1 + int(quota) for quota in quotas]
    leftover = users - sum(sizes)
    by_remainder = sorted(range(orgs), key=lambda i: (int(quotas[i]) - quotas[i], i))
    for index in by_remainder[:leftover]:
        sizes[index] += 1
    return sizes


def _unique_token(rng: random.Random, bits: int, seen: set[str]) -> str:
    width = bits // 4
    while True:
        token = f"{rng.getrandbits(bits):0{width}x}"
        if token not in seen:
            seen.add(token)
            return token


class _Population:
    """Orgs and members, built once from the seeded RNG."""

    def __init__(self, rng: random.Random, orgs: int, users: int) -> None:
        sizes = _org_sizes(orgs, users)
        big_ranks = max(1, orgs // 5)
        seen: set[str] = set()
        self.org_ids: list[str] = []
        self.org_plans: list[str] = []
        # Members as parallel lists (fast indexed access in the hot loop).
        self.member_org: list[int] = []
        self.member_ids: list[str] = []
        self.member_tiers: list[str] = []
        self.member_code_share: list[float] = []
        cumulative_activity: list[float] = []
        activity = 0.0
        for rank, size in enumerate(sizes):
            org_id = "org-" + _unique_token(rng, 40, seen)
            if rank == 0:
                plan = "ENTERPRISE"  # the largest customer; guarantees the mix
            elif rank == orgs - 1:
                plan = "TEAM"  # the smallest one
            else:
                enterprise_share = 0.7 if rank < big_ranks else 0.3
                plan = "ENTERPRISE" if rng.random() < enterprise_share else "TEAM"
            self.org_ids.append(org_id)
            self.org_plans.append(plan)
            premium_share = 0.3 if plan == "ENTERPRISE" else 0.2
            for _ in range(size):
                self.member_org.append(rank)
                self.member_ids.append("user-" + _unique_token(rng, 48, seen))
                self.member_tiers.append("PREMIUM" if rng.random() < premium_share else "STANDARD")
                # Two kinds of member: developers living in Claude Code, and chat users.
                self.member_code_share.append(0.75 if rng.random() < 0.4 else 0.1)
                activity += rng.lognormvariate(0.0, 1.0)
                cumulative_activity.append(activity)
        self.cumulative_activity = cumulative_activity
        self.total_activity = activity

    def pick_member(self, uniform: float) -> int:
        """A member index, proportional to activity weight, given a uniform draw in [0, 1)."""
        target = uniform * self.total_activity
        return min(bisect.bisect_right(self.cumulative_activity, target), len(self.member_ids) - 1)


_CACHE_WRITE_MAX = 100_000
_QUANTILES = 1024
_STANDARD_NORMAL_QUANTILES = [
    NormalDist().inv_cdf((i + 0.5) / _QUANTILES) for i in range(_QUANTILES)
]


def _lognormal_table(median: float, sigma: float, high: int) -> list[int]:
    """Quantiles of a log-normal token count, clipped to ``[1, high]``, for :func:`_draw`.

    Sampling by inverse CDF from a table (with interpolation) is several times faster than
    ``random.gauss`` plus ``math.exp`` per draw, which matters at a million events.
    """
    return [
        max(1, min(high, int(median * math.exp(sigma * z)))) for z in _STANDARD_NORMAL_QUANTILES
    ]


def _draw(table: list[int], uniform: float) -> int:
    """A token count from a :func:`_lognormal_table`, given a uniform draw in [0, 1).

    Interpolates between neighbouring quantiles; ``index + 1`` stays within the table because
    ``position < _QUANTILES - 1``.
    """
    position = uniform * (_QUANTILES - 1)
    index = int(position)
    low = table[index]
    return low + int((table[index + 1] - low) * (position - index))


@dataclass(frozen=True, slots=True)
class _ProductMix:
    """Everything a request of one product is drawn from, precomputed."""

    model_cumulative: list[float]
    models: list[str]
    long_context_capable: list[bool]
    input_tokens: list[int]
    output_tokens: list[int]
    cache_write_share: float
    cache_write_tokens: list[int]
    cache_read_share: float
    cache_read_tokens: list[int]

    @classmethod
    def build(cls, product: str) -> _ProductMix:
        cumulative: list[float] = []
        models: list[str] = []
        long_context: list[bool] = []
        total = 0.0
        for family, family_weight in _FAMILY_WEIGHTS[product].items():
            if family_weight == 0:
                continue
            aliases = _FAMILY_ALIASES[family]
            alias_total = sum(weight for _, weight in aliases)
            for model, weight in aliases:
                total += family_weight * weight / alias_total
                cumulative.append(total)
                models.append(model)
                long_context.append(family == "sonnet-4")
        profile = _PROFILES[product]
        return cls(
            model_cumulative=[c / total for c in cumulative],
            models=models,
            long_context_capable=long_context,
            input_tokens=_lognormal_table(
                profile.input_median, profile.input_sigma, profile.input_max
            ),
            output_tokens=_lognormal_table(
                profile.output_median, profile.output_sigma, profile.output_max
            ),
            cache_write_share=profile.cache_write_share,
            cache_write_tokens=_lognormal_table(
                profile.cache_write_median, profile.cache_write_sigma, _CACHE_WRITE_MAX
            ),
            cache_read_share=profile.cache_read_share,
            cache_read_tokens=_lognormal_table(
                profile.cache_read_median, profile.cache_read_sigma, LONG_CONTEXT_THRESHOLD
            ),
        )


# Long-context prompts: their own input and cache-write sizes; cache reads fill the rest.
_LONG_INPUT_TOKENS = _lognormal_table(6_000, 1.0, 60_000)
_LONG_CACHE_WRITE_TOKENS = _lognormal_table(20_000, 1.0, _CACHE_WRITE_MAX)


_BAD_EVENT_DEFECTS: tuple[tuple[str, DeadLetterReason], ...] = (
    ("negative_token_count", DeadLetterReason.INVALID_FIELD),
    ("null_token_count", DeadLetterReason.INVALID_FIELD),
    ("empty_event_id", DeadLetterReason.INVALID_FIELD),
    ("empty_org_id", DeadLetterReason.INVALID_FIELD),
    ("empty_user_id", DeadLetterReason.INVALID_FIELD),
    ("unknown_model", DeadLetterReason.UNKNOWN_MODEL),
    ("before_first_price", DeadLetterReason.NO_PRICE),
    ("future_timestamp", DeadLetterReason.FUTURE_TIMESTAMP),
    ("token_count_out_of_range", DeadLetterReason.OUT_OF_RANGE),
)
_BAD_BYTES_DEFECTS: tuple[tuple[str, DeadLetterReason], ...] = (
    ("garbage_bytes", DeadLetterReason.UNDECODABLE),
    ("unknown_schema_id", DeadLetterReason.UNKNOWN_SCHEMA),
    ("truncated_body", DeadLetterReason.UNDECODABLE),
)
_BAD_DEFECTS = _BAD_EVENT_DEFECTS + _BAD_BYTES_DEFECTS

_TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)

_DUPLICATE_WINDOW = 10_000
"""How many recent valid events a duplicate may re-send (a producer retry is recent)."""


class _Stream:
    """The generator's state: population, clock and recently sent events."""

    def __init__(self, config: GeneratorConfig, now_ms: int) -> None:
        self.config = config
        self.now_ms = now_ms
        self.rng = random.Random(config.seed)
        start_ms, end_ms = event_window(config, now_ms)
        self.timeline = _Timeline(start_ms, end_ms)
        self.population = _Population(self.rng, config.orgs, config.users)
        self.claude = _ProductMix.build("CLAUDE")
        self.claude_code = _ProductMix.build("CLAUDE_CODE")
        # Bound once: read per event in the hot path.
        self.random = self.rng.random
        self.getrandbits = self.rng.getrandbits
        self.events = config.events
        self.tier_change_fraction = config.tier_change_fraction
        self.long_context_fraction = config.long_context_fraction
        self.extra_usage_fraction = config.extra_usage_fraction
        self.recent: list[UsageDict] = []
        self.recent_next = 0

    def valid_event(self, index: int) -> UsageDict:
        """A fresh valid usage event for record ``index`` of the stream."""
        # The hot path: a million calls for a million events, hence the local names.
        random_ = self.random
        population = self.population
        member = population.pick_member(random_())
        if random_() < self.tier_change_fraction:
            tiers = population.member_tiers
            tiers[member] = "STANDARD" if tiers[member] == "PREMIUM" else "PREMIUM"
        org = population.member_org[member]
        if random_() < population.member_code_share[member]:
            product, mix = "CLAUDE_CODE", self.claude_code
        else:
            product, mix = "CLAUDE", self.claude
        model_index = bisect.bisect_right(mix.model_cumulative, random_())
        model_index = min(model_index, len(mix.models) - 1)
        output_tokens = _draw(mix.output_tokens, random_())
        if mix.long_context_capable[model_index] and random_() < self.long_context_fraction:
            prompt = LONG_CONTEXT_THRESHOLD + 1 + int(780_000 * random_() ** 2)
            input_tokens = _draw(_LONG_INPUT_TOKENS, random_())
            cache_write = _draw(_LONG_CACHE_WRITE_TOKENS, random_()) if random_() < 0.6 else 0
            cache_read = prompt - input_tokens - cache_write
        else:
            input_tokens = _draw(mix.input_tokens, random_())
            cache_write = (
                _draw(mix.cache_write_tokens, random_()) if random_() < mix.cache_write_share else 0
            )
            cache_read = (
                _draw(mix.cache_read_tokens, random_()) if random_() < mix.cache_read_share else 0
            )
            # Input and cache write are capped well below the threshold; keep the prompt there.
            cache_read = min(cache_read, LONG_CONTEXT_THRESHOLD - input_tokens - cache_write)
        timeline = self.timeline
        occurred_at = timeline.at((index + 0.5) / self.events) + int((random_() - 0.5) * _JITTER_MS)
        occurred_at = min(timeline.end_ms, max(timeline.start_ms, occurred_at))
        return {
            "event_id": _uuid4(self.getrandbits(128)),
            "occurred_at": occurred_at,
            "org_id": population.org_ids[org],
            "plan": population.org_plans[org],
            "user_id": population.member_ids[member],
            "seat_tier": population.member_tiers[member],
            "product": product,
            "model": mix.models[model_index],
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
            "extra_usage": random_() < self.extra_usage_fraction,
        }

    def remember(self, event: UsageDict) -> None:
        """Keep ``event`` as a candidate for a later duplicate (a ring of recent events)."""
        if len(self.recent) < _DUPLICATE_WINDOW:
            self.recent.append(event)
        else:
            self.recent[self.recent_next] = event
            self.recent_next = (self.recent_next + 1) % _DUPLICATE_WINDOW

    def duplicate(self) -> Generated:
        """An exact re-send of a recent valid event; mostly a very recent one, like a retry."""
        rng = self.rng
        recent = self.recent
        newest = (self.recent_next - 1) % len(recent)
        back = int(rng.random() ** 3 * len(recent))
        event = dict(recent[(newest - back) % len(recent)])
        return Generated("duplicate", event, None, event["org_id"], None)

    def bad(self, index: int) -> Generated:
        """A bad record of a uniformly chosen defect, tagged with its dead-letter reason."""
        rng = self.rng
        defect, reason = _BAD_DEFECTS[rng.randrange(len(_BAD_DEFECTS))]
        if defect in ("garbage_bytes", "unknown_schema_id", "truncated_body"):
            org_ids = self.population.org_ids
            key = org_ids[rng.randrange(len(org_ids))]
            return Generated("bad_bytes", None, self._bad_bytes(defect), key, reason, defect)
        event = self.valid_event(index)
        field = _TOKEN_FIELDS[rng.randrange(len(_TOKEN_FIELDS))]
        if defect == "negative_token_count":
            event[field] = -rng.randint(1, 5_000)
        elif defect == "null_token_count":
            event[field] = None
        elif defect == "empty_event_id":
            event["event_id"] = ""
        elif defect == "empty_org_id":
            event["org_id"] = ""
        elif defect == "empty_user_id":
            event["user_id"] = ""
        elif defect == "unknown_model":
            event["model"] = UNKNOWN_MODELS[rng.randrange(len(UNKNOWN_MODELS))]
        elif defect == "before_first_price":
            event["occurred_at"] = FIRST_PRICED_MS - 1 - rng.randrange(365 * DAY_MS)
        elif defect == "future_timestamp":
            event["occurred_at"] = self.now_ms + FUTURE_MARGIN_MS + rng.randint(60_000, 7 * DAY_MS)
        else:  # token_count_out_of_range
            event[field] = OUT_OF_RANGE_TOKENS
        return Generated("bad_event", event, None, event["org_id"], reason, defect)

    def _bad_bytes(self, defect: str) -> bytes:
        rng = self.rng
        if defect == "garbage_bytes":
            # A first byte other than 0 is never the Confluent magic byte.
            body = rng.randbytes(rng.randint(0, 63))
            return bytes([rng.randint(1, 255)]) + body
        if defect == "unknown_schema_id":
            return b"\x00" + UNKNOWN_SCHEMA_ID.to_bytes(4, "big") + rng.randbytes(24)
        # A usage record has 13 fields of at least one byte each: 12 bytes can never decode.
        return b"\x00" + USAGE_SCHEMA_ID.to_bytes(4, "big") + rng.randbytes(rng.randint(1, 8))


def generate(config: GeneratorConfig, now_ms: int) -> Iterator[Generated]:
    """Yield ``config.events`` records of synthetic load, deterministically.

    ``now_ms`` is the generation instant (epoch ms): valid events are never later than it,
    future-dated bad records are more than two hours past it. Each record is, independently,
    a duplicate with probability ``duplicate_fraction`` (once an event exists to re-send), a bad
    record with probability ``bad_fraction`` (uniform over the defects: nine invalid events,
    three kinds of bad bytes), else a fresh event. Fresh events have unique ``event_id`` values.

    Raises :class:`ConfigError` before yielding anything when the time window is unusable.
    """
    stream = _Stream(config, now_ms)  # validates the window eagerly, before the first next()
    return _records(stream)


def _records(stream: _Stream) -> Iterator[Generated]:
    config = stream.config
    rng = stream.rng
    duplicate_below = config.duplicate_fraction
    bad_below = config.duplicate_fraction + config.bad_fraction
    valid_event = stream.valid_event
    remember = stream.remember
    for index in range(config.events):
        draw = rng.random()
        if draw < duplicate_below and stream.recent:
            yield stream.duplicate()
        elif duplicate_below <= draw < bad_below:
            yield stream.bad(index)
        else:
            event = valid_event(index)
            remember(dict(event))  # a private copy: consumers may mutate what they get
            yield Generated("event", event, None, event["org_id"], None)
