"""The price table and the pricing rule (SPEC §2): which rates apply to a request, and its cost.

The table is reference data in the repository (``data/price_table.toml``), versioned by
``effective_from``. It is loaded once at process start with :meth:`PriceTable.load`; every
defect an operator can make in it (an inexact or negative rate, a dangling alias, two versions at
one instant, ...) is a :class:`~core.errors.PriceTableError` raised there, with one line naming
the version, family and field, so a bad table never reaches the hot path.

Pricing itself is exact integer arithmetic. A rate of ``X`` USD per million tokens is
``X * 1000`` nano-USD per token, and the table only admits rates for which that is a whole
number, so a request costs ``sum(tokens_k * rate_k)`` nano-USD with no rounding anywhere.
Floats never touch a rate: decimal strings are converted with :mod:`decimal`.

:meth:`PriceTable.price` runs for every event (tens of thousands per second), so everything that
can be decided at load time is: aliases are resolved to their :class:`FamilyPrice` once per
version, versions are located by bisection over their start instants, and the last version hit
is remembered because live traffic almost always lands in the newest one.

Everything here is stdlib-only and side-effect free apart from reading the table file.
"""

from __future__ import annotations

import re
import tomllib
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from itertools import pairwise
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from core.errors import NoPriceError, PriceTableError, UnknownModelError
from core.usage import Price, TokenUsage

__all__ = [
    "RATE_FIELDS",
    "FamilyPrice",
    "PriceTable",
    "PriceVersion",
    "Rates",
    "default_price_table_path",
]

#: The four rate names, in the table file and on :class:`Rates`, in token-field order
#: (input, output, cache write, cache read).
RATE_FIELDS: tuple[str, ...] = ("input", "output", "cache_write", "cache_read")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
# Larger than any epoch-ms instant an event can carry: the open end of the newest version.
_END_OF_TIME_MS = 2**63

# A plain decimal: optional sign, digits, optional fraction. No exponent, no "NaN"/"Infinity",
# no underscores or spaces, so what the operator wrote is exactly the number that is used.
_DECIMAL_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")
# RFC 3339 date-time (upper-cased before matching, since "t" and "z" are allowed lower case).
_INSTANT_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})",
)

_VERSION_KEYS = frozenset({"id", "effective_from", "families", "aliases"})
_FAMILY_KEYS = frozenset({"display_name", "long_context", *RATE_FIELDS})
_LONG_CONTEXT_KEYS = frozenset({"threshold_tokens", *RATE_FIELDS})


def default_price_table_path() -> Path:
    """The price table shipped in the repository: ``<repo>/data/price_table.toml``."""
    return Path(__file__).resolve().parents[1] / "data" / "price_table.toml"


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rates:
    """One tier's rates, in integer nano-USD per token, for the four token kinds.

    Construction raises :class:`PriceTableError` unless every rate is a non-negative ``int``.
    """

    input: int
    output: int
    cache_write: int
    cache_read: int

    def __post_init__(self) -> None:
        for name in RATE_FIELDS:
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
                raise PriceTableError(
                    f"rate {name!r} must be a non-negative integer of nano-USD per token, "
                    f"got {rate!r}"
                )

    def cost(self, usage: TokenUsage) -> int:
        """Exact cost in nano-USD of ``usage`` at these rates (token counts are >= 0)."""
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_creation_input_tokens * self.cache_write
            + usage.cache_read_input_tokens * self.cache_read
        )


@dataclass(frozen=True, slots=True)
class FamilyPrice:
    """The prices of one model family within one price version.

    ``family_id`` is the value of ClickHouse's ``model_family`` column; ``display_name`` is for
    people. ``long_context`` rates, when present, apply to every token kind of a request whose
    prompt (input + cache write + cache read) is strictly greater than
    ``long_context_threshold`` tokens.

    Construction raises :class:`PriceTableError` when a tier comes without its threshold (or a
    threshold without a tier), the threshold is not a positive integer, or a long-context rate
    is below the standard one (a long prompt never makes a request cheaper).
    """

    family_id: str
    display_name: str
    standard: Rates
    long_context: Rates | None = None
    long_context_threshold: int | None = None
    # The threshold as a plain int (0 without a tier) so the hot path needs no None check on it.
    _threshold: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        where = f"family {self.family_id!r}"
        if not isinstance(self.family_id, str) or not self.family_id:
            raise PriceTableError(f"family id must be a non-empty string, got {self.family_id!r}")
        if not isinstance(self.display_name, str) or not self.display_name.strip():
            raise PriceTableError(f"{where}, field 'display_name': must be a non-empty string")
        threshold = self.long_context_threshold
        if self.long_context is None:
            if threshold is not None:
                raise PriceTableError(
                    f"{where}, field 'long_context.threshold_tokens': a threshold without "
                    "long-context rates"
                )
            return
        if threshold is None:
            raise PriceTableError(
                f"{where}, field 'long_context.threshold_tokens': a long-context tier needs the "
                "prompt size (in tokens) above which it applies"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold <= 0:
            raise PriceTableError(
                f"{where}, field 'long_context.threshold_tokens': must be a positive integer, "
                f"got {threshold!r}"
            )
        for name in RATE_FIELDS:
            long_rate = getattr(self.long_context, name)
            standard_rate = getattr(self.standard, name)
            if long_rate < standard_rate:
                raise PriceTableError(
                    f"{where}, field 'long_context.{name}': {long_rate} nano-USD/token is below "
                    f"the standard rate of {standard_rate}"
                )
        object.__setattr__(self, "_threshold", threshold)


@dataclass(frozen=True, slots=True)
class PriceVersion:
    """A complete price list, in force from ``effective_from_ms`` until the next version starts.

    ``families`` maps family id to its prices; ``aliases`` maps each model id accepted in usage
    events (exact, case-sensitive) to a family id of this version. Only aliases resolve: a family
    id is not itself a model id unless listed as an alias.

    Construction freezes both mappings and raises :class:`PriceTableError` when the version id is
    empty, a ``families`` key differs from its family's id, or an alias names an unknown family.
    """

    version_id: str
    effective_from_ms: int
    families: Mapping[str, FamilyPrice]
    aliases: Mapping[str, str]
    # model id -> FamilyPrice, resolved once so pricing is a single dict lookup. A plain dict
    # (never handed out, never mutated) because a mappingproxy lookup costs more on the hot path.
    _by_model: dict[str, FamilyPrice] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if not isinstance(self.version_id, str) or not self.version_id:
            raise PriceTableError(f"version id must be a non-empty string, got {self.version_id!r}")
        where = f"version {self.version_id!r}"
        if isinstance(self.effective_from_ms, bool) or not isinstance(self.effective_from_ms, int):
            raise PriceTableError(
                f"{where}, field 'effective_from': must be epoch milliseconds (int), "
                f"got {self.effective_from_ms!r}"
            )
        families = dict(self.families)
        for family_id, family in families.items():
            if family.family_id != family_id:
                raise PriceTableError(
                    f"{where}, family {family_id!r}: listed under a different id than its own "
                    f"({family.family_id!r})"
                )
        aliases = dict(self.aliases)
        by_model: dict[str, FamilyPrice] = {}
        for model, family_id in aliases.items():
            if not isinstance(model, str) or not model:
                raise PriceTableError(
                    f"{where}, aliases: a model id must be a non-empty string, got {model!r}"
                )
            family = families.get(family_id)
            if family is None:
                known = ", ".join(sorted(families)) or "none"
                raise PriceTableError(
                    f"{where}, alias {model!r}: family {family_id!r} is not defined in this "
                    f"version (families: {known})"
                )
            by_model[model] = family
        object.__setattr__(self, "families", MappingProxyType(families))
        object.__setattr__(self, "aliases", MappingProxyType(aliases))
        object.__setattr__(self, "_by_model", by_model)

    def __hash__(self) -> int:
        # The generated hash would fail on the mapping fields; id and instant identify a version.
        return hash((self.version_id, self.effective_from_ms))

    @property
    def effective_from(self) -> datetime:
        """``effective_from_ms`` as an aware UTC datetime (for display)."""
        return _EPOCH + self.effective_from_ms * _ONE_MS

    def family_of(self, model: str) -> FamilyPrice:
        """The family ``model`` resolves to; :class:`UnknownModelError` if it is not an alias."""
        family = self._by_model.get(model)
        if family is None:
            raise UnknownModelError(model, self.version_id)
        return family

    def price(self, model: str, usage: TokenUsage) -> Price:
        """Price one request under this version, whatever its date.

        Raises :class:`UnknownModelError` (dead letter ``UNKNOWN_MODEL``) when ``model`` is not
        an alias of this version; never returns a zero price for an unknown model. Token counts
        are assumed validated (>= 0) by the caller.
        """
        family = self._by_model.get(model)
        if family is None:
            raise UnknownModelError(model, self.version_id)
        long_rates = family.long_context
        if long_rates is not None and usage.prompt_tokens > family._threshold:
            return Price(family.family_id, self.version_id, True, long_rates.cost(usage))
        return Price(family.family_id, self.version_id, False, family.standard.cost(usage))


class PriceTable:
    """Every price version, ordered by ``effective_from``; prices events by their date.

    Build one with :meth:`load` (the TOML file) or :meth:`from_mapping` (its parsed form), or
    directly from :class:`PriceVersion` values. Construction raises :class:`PriceTableError`
    when there is no version, or two versions share an id or an ``effective_from``.

    A table is immutable once built and safe to share; the only internal state is a cache of
    the last version looked up, replaced atomically.
    """

    __slots__ = ("_last", "_starts", "_versions", "source")

    def __init__(self, versions: Iterable[PriceVersion], *, source: str = "price table") -> None:
        ordered = sorted(versions, key=lambda version: version.effective_from_ms)
        if not ordered:
            raise PriceTableError(
                f"{source}: no price versions (empty table); add at least one [[versions]] entry"
            )
        seen_ids: set[str] = set()
        for version in ordered:
            if version.version_id in seen_ids:
                raise PriceTableError(
                    f"{source}: version {version.version_id!r}, field 'id': used by two versions"
                )
            seen_ids.add(version.version_id)
        for earlier, later in pairwise(ordered):
            if earlier.effective_from_ms == later.effective_from_ms:
                raise PriceTableError(
                    f"{source}: version {later.version_id!r}, field 'effective_from': "
                    f"{_format_instant(later.effective_from_ms)} is also the effective_from of "
                    f"version {earlier.version_id!r}"
                )
        self.source = source
        self._versions: tuple[PriceVersion, ...] = tuple(ordered)
        self._starts: list[int] = [version.effective_from_ms for version in ordered]
        newest = ordered[-1]
        # (start_ms, end_ms exclusive, version) of the last lookup; starts at the newest version,
        # which is where live events land.
        self._last: tuple[int, int, PriceVersion] = (
            newest.effective_from_ms,
            _END_OF_TIME_MS,
            newest,
        )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str) -> PriceTable:
        """Read and validate the TOML price table at ``path``.

        Every problem — unreadable file, TOML syntax, or any defect :meth:`from_mapping`
        rejects — raises :class:`PriceTableError` with one line starting with the path.
        """
        path = Path(path)
        source = f"price table {path}"
        try:
            with path.open("rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise PriceTableError(f"{source}: cannot read it: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise PriceTableError(f"{source}: not UTF-8 text: {exc.reason}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise PriceTableError(f"{source}: invalid TOML: {exc}") from exc
        return cls.from_mapping(data, source=source)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "price table") -> PriceTable:
        """Build a table from the parsed form of the TOML file (see ``data/price_table.toml``).

        ``{"versions": [{"id", "effective_from", "families": {...}, "aliases": {...}}, ...]}``
        with rates as decimal strings in USD per MTok and ``effective_from`` an RFC 3339 UTC
        instant. Raises :class:`PriceTableError`, one line naming the version, family and
        field, for any missing, unknown or malformed field; a rate that is negative or not a
        whole number of nano-USD per token; a non-UTC instant; a long-context tier without a
        threshold; an alias to an unknown family; duplicate version ids or instants; or no
        versions at all.
        """
        table = _as_table(data, source)
        _check_keys(table, frozenset({"versions"}), source)
        raw_versions = table.get("versions")
        if raw_versions is None or raw_versions == []:
            raise PriceTableError(
                f"{source}: no price versions (empty table); add at least one [[versions]] entry"
            )
        if not isinstance(raw_versions, list):
            _fail(source, "'versions' must be an array of tables ([[versions]])")
        versions = [
            _parse_version(raw, index, source) for index, raw in enumerate(raw_versions, start=1)
        ]
        return cls(versions, source=source)

    # -- queries -----------------------------------------------------------------------------

    @property
    def versions(self) -> tuple[PriceVersion, ...]:
        """All versions, oldest ``effective_from`` first."""
        return self._versions

    @property
    def version_ids(self) -> tuple[str, ...]:
        """The version ids, oldest first."""
        return tuple(version.version_id for version in self._versions)

    def version_by_id(self, version_id: str) -> PriceVersion:
        """The version called ``version_id``; ``KeyError`` if there is none."""
        for version in self._versions:
            if version.version_id == version_id:
                return version
        raise KeyError(version_id)

    def version_at(self, occurred_at_ms: int) -> PriceVersion:
        """The newest version whose ``effective_from`` is at or before ``occurred_at_ms``.

        Raises :class:`NoPriceError` (dead letter ``NO_PRICE``) when the instant precedes every
        version.
        """
        start, end, version = self._last
        if start <= occurred_at_ms < end:
            return version
        starts = self._starts
        index = bisect_right(starts, occurred_at_ms) - 1
        if index < 0:
            raise NoPriceError(occurred_at_ms, starts[0])
        version = self._versions[index]
        end = starts[index + 1] if index + 1 < len(starts) else _END_OF_TIME_MS
        self._last = (starts[index], end, version)
        return version

    def price(self, model: str, usage: TokenUsage, occurred_at_ms: int) -> Price:
        """Price one request that occurred at ``occurred_at_ms`` (epoch ms, UTC).

        The version in force at that instant decides the model's family and rates; if the
        family has a long-context tier and the prompt exceeds its threshold, all four token
        kinds are priced at the long-context rates. Raises :class:`NoPriceError` or
        :class:`UnknownModelError`, both dead-letter reasons; never returns a guessed price.
        """
        return self.version_at(occurred_at_ms).price(model, usage)

    def __repr__(self) -> str:
        return f"PriceTable(source={self.source!r}, versions={list(self.version_ids)!r})"


# --------------------------------------------------------------------------------------------
# Parsing the file's structure. Each helper gets ``where`` ("<source>: version 'x', family 'y'")
# so the error it raises names exactly the offending spot in one line.
# --------------------------------------------------------------------------------------------


def _fail(where: str, problem: str) -> NoReturn:
    raise PriceTableError(f"{where}: {problem}")


def _as_table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(where, f"expected a table, got {type(value).__name__} {value!r}")
    return value


def _check_keys(table: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            expected = ", ".join(sorted(allowed))
            _fail(where, f"unknown field {key!r} (expected: {expected})")


def _require(table: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in table:
        _fail(where, f"missing field {key!r}")
    return table[key]


def _require_string(table: Mapping[str, Any], key: str, where: str) -> str:
    value = _require(table, key, where)
    if not isinstance(value, str) or not value.strip():
        _fail(f"{where}, field {key!r}", f"must be a non-empty string, got {value!r}")
    return value


def _parse_version(raw: object, index: int, source: str) -> PriceVersion:
    table = _as_table(raw, f"{source}: version #{index}")
    version_id = _require_string(table, "id", f"{source}: version #{index}")
    where = f"{source}: version {version_id!r}"
    _check_keys(table, _VERSION_KEYS, where)
    effective_from_ms = _parse_instant(
        _require(table, "effective_from", where), f"{where}, field 'effective_from'"
    )

    raw_families = _as_table(_require(table, "families", where), f"{where}, field 'families'")
    if not raw_families:
        _fail(f"{where}, field 'families'", "defines no model family")
    families = {
        family_id: _parse_family(family_id, raw_family, where)
        for family_id, raw_family in raw_families.items()
    }

    raw_aliases = _as_table(_require(table, "aliases", where), f"{where}, field 'aliases'")
    if not raw_aliases:
        _fail(f"{where}, field 'aliases'", "defines no model id, so nothing could be priced")
    for model, family_id in raw_aliases.items():
        if not isinstance(family_id, str):
            _fail(f"{where}, alias {model!r}", f"family id must be a string, got {family_id!r}")

    try:
        return PriceVersion(version_id, effective_from_ms, families, raw_aliases)
    except PriceTableError as exc:
        raise PriceTableError(f"{source}: {exc}") from exc


def _parse_family(family_id: str, raw: object, version_where: str) -> FamilyPrice:
    where = f"{version_where}, family {family_id!r}"
    table = _as_table(raw, where)
    _check_keys(table, _FAMILY_KEYS, where)
    display_name = _require_string(table, "display_name", where)
    standard = _parse_rates(table, where, prefix="")

    long_context: Rates | None = None
    threshold: int | None = None
    if "long_context" in table:
        tier = _as_table(table["long_context"], f"{where}, field 'long_context'")
        _check_keys(tier, _LONG_CONTEXT_KEYS, f"{where}, field 'long_context'")
        if "threshold_tokens" not in tier:
            _fail(
                f"{where}, field 'long_context.threshold_tokens'",
                "missing: a long-context tier needs the prompt size (tokens) above which it "
                "applies",
            )
        threshold = tier["threshold_tokens"]
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold <= 0:
            _fail(
                f"{where}, field 'long_context.threshold_tokens'",
                f"must be a positive integer number of tokens, got {threshold!r}",
            )
        long_context = _parse_rates(tier, where, prefix="long_context.")

    try:
        return FamilyPrice(family_id, display_name, standard, long_context, threshold)
    except PriceTableError as exc:
        # FamilyPrice names the family and field; put the source and version in front.
        raise PriceTableError(f"{version_where}, {exc}") from exc


def _parse_rates(table: Mapping[str, Any], where: str, *, prefix: str) -> Rates:
    nano = {
        name: _nano_per_token(
            _require(table, name, f"{where}, field '{prefix.rstrip('.')}'" if prefix else where),
            f"{where}, field '{prefix}{name}'",
        )
        for name in RATE_FIELDS
    }
    return Rates(**nano)


def _nano_per_token(raw: object, where: str) -> int:
    """Convert a USD-per-MTok decimal string to whole nano-USD per token, exactly."""
    if not isinstance(raw, str):
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            _fail(
                where,
                f'write the rate as a quoted decimal string (e.g. "{raw}"), not the TOML '
                f"number {raw!r}",
            )
        _fail(where, f"must be a decimal string in USD per MTok, got {raw!r}")
    if not _DECIMAL_RE.fullmatch(raw):
        _fail(where, f"{raw!r} is not a decimal number of USD per MTok")
    usd_per_mtok = Decimal(raw)
    if usd_per_mtok < 0:
        _fail(where, f"{raw!r} USD/MTok is negative")
    # $1/MTok = 1e9 nano-USD / 1e6 tokens = 1000 nano-USD per token. Enough precision for
    # every digit written, so the shift is exact and the integrality test is meaningful.
    with localcontext() as context:
        context.prec = len(raw) + 8
        nano = usd_per_mtok.scaleb(3)
    if nano != nano.to_integral_value():
        _fail(
            where,
            f"{raw!r} USD/MTok is not a whole number of nano-USD per token "
            f"({raw} x 1000 = {nano.normalize():f}); use at most 3 decimal places",
        )
    return int(nano)


def _parse_instant(raw: object, where: str) -> int:
    """An RFC 3339 instant in UTC (``Z`` or ``+00:00``) as epoch milliseconds."""
    if isinstance(raw, datetime):
        # An unquoted TOML offset date-time; accepted if it is unambiguously UTC.
        offset = raw.utcoffset()
        if offset is None:
            _fail(where, f"{raw.isoformat()} has no UTC offset; write it like 2025-01-01T00:00:00Z")
        if offset != timedelta(0):
            _fail(where, f"{raw.isoformat()} is not in UTC; use a Z or +00:00 offset")
        if raw.microsecond % 1000:
            _fail(where, f"{raw.isoformat()} is finer than a millisecond")
        return (raw - _EPOCH) // _ONE_MS
    if not isinstance(raw, str):
        _fail(where, f'must be an RFC 3339 UTC instant like "2025-01-01T00:00:00Z", got {raw!r}')
    match = _INSTANT_RE.fullmatch(raw.upper())
    if match is None:
        _fail(where, f'{raw!r} is not an RFC 3339 instant like "2025-01-01T00:00:00Z"')
    base, fraction, offset_text = match.groups()
    if offset_text not in ("Z", "+00:00"):
        _fail(where, f"{raw!r} is not in UTC; use a Z or +00:00 offset")
    fraction = fraction or ""
    if fraction[3:].strip("0"):
        _fail(where, f"{raw!r} is finer than a millisecond")
    try:
        instant = datetime.fromisoformat(base).replace(tzinfo=UTC)
    except ValueError as exc:
        raise PriceTableError(f"{where}: {raw!r} is not a valid instant ({exc})") from exc
    return (instant - _EPOCH) // _ONE_MS + int(fraction[:3].ljust(3, "0"))


def _format_instant(epoch_ms: int) -> str:
    text = (_EPOCH + epoch_ms * _ONE_MS).isoformat(timespec="milliseconds")
    return text.replace(".000+00:00", "Z").replace("+00:00", "Z")
