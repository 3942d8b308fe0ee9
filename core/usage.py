"""Domain values: a usage event as the worker sees it after validation, and its priced form.

Field names are the SPEC §3 field names (also the Avro and JSON names). Money is integer
nano-USD everywhere (``cost_nano``); 1 USD = 1_000_000_000 nano-USD.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

NANO_PER_USD = 1_000_000_000


class Plan(StrEnum):
    TEAM = "TEAM"
    ENTERPRISE = "ENTERPRISE"


class SeatTier(StrEnum):
    STANDARD = "STANDARD"
    PREMIUM = "PREMIUM"


class Product(StrEnum):
    CLAUDE = "CLAUDE"
    CLAUDE_CODE = "CLAUDE_CODE"


TOKEN_FIELDS: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """The four token counts of one request (Messages API usage block). All >= 0."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int

    @property
    def prompt_tokens(self) -> int:
        """Prompt size for the long-context rule: input + cache write + cache read."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One validated usage event. ``occurred_at_ms`` is epoch milliseconds, UTC."""

    event_id: str
    occurred_at_ms: int
    org_id: str
    plan: Plan
    user_id: str
    seat_tier: SeatTier
    product: Product
    model: str
    usage: TokenUsage
    extra_usage: bool


@dataclass(frozen=True, slots=True)
class Price:
    """What pricing decided for one request."""

    model_family: str
    pricing_version: str
    long_context: bool
    cost_nano: int


@dataclass(frozen=True, slots=True)
class PricedEvent:
    """A usage event with its price: the row behind ``metering.priced_events``.

    ``revision`` orders rewrites of the same event in the store: 0 for live pricing, a replay's
    revision (larger) when history is re-priced, so the newest pricing wins on deduplication.
    """

    event: UsageEvent
    price: Price
    revision: int = 0

    @property
    def extra_cost_nano(self) -> int:
        """The billable part: the whole cost for extra-usage events, else zero."""
        return self.price.cost_nano if self.event.extra_usage else 0
