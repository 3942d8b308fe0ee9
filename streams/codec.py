"""Avro codecs for every topic: the Confluent wire format over fastavro.

A message value is ``0x00`` (magic byte), the writer schema's id as 4 big-endian bytes, then
the Avro binary body (SPEC §3), so producers using Confluent serializers interoperate.

The contracts are the ``.avsc`` files under ``avro/`` (a data folder, not a package). Schema
ids come from a :class:`SchemaResolver`: :class:`PinnedSchemas` (ids pinned in
``avro/schema_ids.json``) when no registry is configured, else :class:`RegistrySchemas` (a
Confluent Schema Registry). Either way a codec's *reader* schema is the repository's current
version of its subject, and a record written with any older registered version is resolved
against it (Avro schema resolution), so old writers stay readable.

Failure contract:

* :meth:`Codec.decode` turns every malformed value into :class:`~core.errors.RejectedEvent`
  with reason ``UNDECODABLE`` (not the wire format, truncated, garbage, trailing bytes) or
  ``UNKNOWN_SCHEMA`` (well-formed header, but an id the resolver does not know, an id of
  another subject, or a writer schema that cannot be resolved against ours). Bad bytes never
  raise anything else. Registry outages are not bad bytes: they raise :class:`RegistryError`
  (retry; never commit past it), and a registry that refuses us (auth, incompatible schema)
  raises :class:`~core.errors.ConfigError`.
* :meth:`Codec.encode` validates the record against the schema first and raises
  :class:`EncodeError` with a one-line message naming the field; it never writes a silently
  coerced value (fastavro alone would write ``5`` for a boolean or truncate ``1.5``).

Timestamps (``timestamp-millis`` fields) are int epoch milliseconds both ways: the schemas are
parsed without their temporal logical types, which changes nothing on the wire but keeps
fastavro from turning them into ``datetime``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint, to_parsing_canonical_form

from core.errors import ConfigError, DeadLetterReason, MeteringError, RejectedEvent
from core.usage import (
    Plan,
    Price,
    PricedEvent,
    Product,
    SeatTier,
    TokenUsage,
    UsageEvent,
)

if TYPE_CHECKING:
    from core.settings import Settings

AVRO_DIR = Path(__file__).resolve().parents[1] / "avro"
"""The repository's schema folder: ``.avsc`` files and ``schema_ids.json``."""

PINNED_IDS_FILE = "schema_ids.json"
MAGIC_BYTE = 0
HEADER_SIZE = 5
MAX_SCHEMA_ID = 2**31 - 1
MAX_DEAD_LETTER_ORIGINAL_BYTES = 256 * 1024
"""Dead letters keep at most this many bytes of the original value (SPEC §3)."""

# Logical types that fastavro would turn into date/time objects. Removing them from the parsed
# schema keeps the values as the ints they are on the wire.
_TEMPORAL_LOGICAL_TYPES = frozenset(
    {
        "timestamp-millis",
        "timestamp-micros",
        "local-timestamp-millis",
        "local-timestamp-micros",
        "date",
        "time-millis",
        "time-micros",
    }
)

# fastavro's parsed-schema form has no public type; it is nested dicts, lists and strings.
ParsedSchema = Any


class Subject(StrEnum):
    """Registry subjects (topic-name strategy: ``<topic>-value``).

    Subjects are named after the base topic names and never include a deployment's
    ``METERING_TOPIC_PREFIX``: the contract is the same whatever the prefix.
    """

    USAGE = "usage.events-value"
    PRICED = "metering.priced-value"
    PAUSES = "metering.pauses-value"
    BILLING = "metering.billing-value"
    CONTROL = "metering.control-value"
    DEAD_LETTER = "metering.dead-letter-value"
    REPLAYS = "metering.replays-value"


def subject_for_topic(topic: str) -> str:
    """The value subject of a base topic name (topic-name strategy)."""
    return f"{topic}-value"


class EncodeError(MeteringError):
    """A record does not match its schema; the message names the field. A bug in the caller
    (or bad operator input to ``metering produce``), never a reason to retry."""


class SchemaError(ConfigError):
    """A schema text or the pinned-id file is unusable (not Avro, unparseable, inconsistent)."""


class RegistryError(MeteringError):
    """The schema registry could not be reached or failed. Infrastructure trouble: retry, and
    never commit an offset past the record that needed it."""


# --------------------------------------------------------------------------------------------
# Schemas


@dataclass(frozen=True, slots=True, eq=False)
class AvroSchema:
    """One Avro record schema, parsed once.

    ``text`` is the schema as published (what a registry stores, logical types included).
    ``parsed`` is fastavro's parsed form with temporal logical types removed, so timestamps
    stay int epoch milliseconds; the binary encoding is identical. ``canonical_form`` is the
    Avro Parsing Canonical Form: two schemas with the same one encode records identically.
    """

    text: str
    fullname: str
    canonical_form: str
    parsed: ParsedSchema

    @classmethod
    def from_text(cls, text: str) -> AvroSchema:
        """Parse a schema given as JSON text. Raises :class:`SchemaError` if it is not a valid
        Avro record schema."""
        try:
            source = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"schema is not JSON: {exc}") from exc
        return cls.from_json(source, text=text)

    @classmethod
    def from_json(cls, source: Any, *, text: str | None = None) -> AvroSchema:
        """Parse a schema given as decoded JSON. Raises :class:`SchemaError` if it is not a
        valid Avro record schema."""
        if not isinstance(source, dict) or source.get("type") != "record":
            raise SchemaError("schema is not an Avro record schema")
        try:
            parsed = fastavro.parse_schema(_without_temporal_logical_types(source))
            canonical = to_parsing_canonical_form(source)
        except Exception as exc:  # fastavro raises many types for a bad schema
            raise SchemaError(f"invalid Avro schema: {_one_line(exc)}") from exc
        return cls(
            text=text if text is not None else json.dumps(source),
            fullname=parsed["name"],
            canonical_form=canonical,
            parsed=parsed,
        )

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the Parsing Canonical Form (ignores docs, defaults, logical types)."""
        return fingerprint(self.canonical_form, "SHA-256")


def _without_temporal_logical_types(schema: Any) -> Any:
    """A copy of ``schema`` (new containers all the way down) without temporal logical types."""

    def strip(node: Any) -> Any:
        if isinstance(node, list):
            return [strip(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: strip(value) for key, value in node.items()}
        if out.get("logicalType") in _TEMPORAL_LOGICAL_TYPES:
            del out["logicalType"]
        return out

    return strip(schema)


# --------------------------------------------------------------------------------------------
# Resolvers


class SchemaResolver(Protocol):
    """Where schema ids come from: pinned in the repository or a Schema Registry."""

    def writer_id(self, subject: str, schema: AvroSchema) -> int:
        """The id to frame records written with ``schema`` on ``subject``.

        Raises :class:`~core.errors.ConfigError` when the schema cannot be used there (not
        pinned, refused by the registry) and :class:`RegistryError` on registry trouble.
        """
        ...

    def writer_schema(self, subject: str, schema_id: int) -> AvroSchema:
        """The schema a record found on ``subject`` with ``schema_id`` was written with.

        Raises :class:`~core.errors.RejectedEvent` (``UNKNOWN_SCHEMA``) for an id that is
        unknown, belongs to another subject or is not a usable Avro schema, and
        :class:`RegistryError` on registry trouble.
        """
        ...


@dataclass(frozen=True, slots=True)
class PinnedVersion:
    """One pinned version of a subject: its id, its ``.avsc`` file and the parsed schema."""

    schema_id: int
    file: str
    schema: AvroSchema


class PinnedSchemas:
    """Schema ids pinned in the repository (``avro/schema_ids.json``), for running without a
    registry. Also the catalog of the repository's schemas: the last version listed for a
    subject is its current version, which codecs read and write with.

    Load it once at start (:meth:`load`); every problem with the file is a
    :class:`SchemaError`, so a broken contract stops the process before it reads anything.
    """

    def __init__(self, subjects: Mapping[str, Sequence[PinnedVersion]]) -> None:
        self._subjects: dict[str, tuple[PinnedVersion, ...]] = {}
        self._by_id: dict[int, tuple[str, PinnedVersion]] = {}
        for subject, versions in subjects.items():
            if not versions:
                raise SchemaError(f"subject {subject} has no pinned version")
            fullnames = {version.schema.fullname for version in versions}
            if len(fullnames) > 1:
                raise SchemaError(
                    f"subject {subject} mixes record names {sorted(fullnames)}; "
                    "a subject's versions must all be the same record"
                )
            for version in versions:
                if not 0 < version.schema_id <= MAX_SCHEMA_ID:
                    raise SchemaError(f"schema id {version.schema_id} is not in 1..{MAX_SCHEMA_ID}")
                if version.schema_id in self._by_id:
                    other = self._by_id[version.schema_id][0]
                    raise SchemaError(
                        f"schema id {version.schema_id} is pinned twice ({other}, {subject})"
                    )
                self._by_id[version.schema_id] = (subject, version)
            self._subjects[subject] = tuple(versions)

    @classmethod
    def load(cls, avro_dir: Path = AVRO_DIR) -> PinnedSchemas:
        """Read ``schema_ids.json`` and every ``.avsc`` it names from ``avro_dir``.

        Each entry is ``{"id": int, "file": str, "pcf_sha256": hex}``; the fingerprint guards
        published versions against being edited in place (a doc change is fine, a change to
        the encoding is not: add a version instead). Raises :class:`SchemaError`.
        """
        ids_path = avro_dir / PINNED_IDS_FILE
        try:
            catalog = json.loads(ids_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SchemaError(f"cannot read {ids_path}: {_one_line(exc)}") from exc
        if not isinstance(catalog, dict):
            raise SchemaError(f"{ids_path} must map subjects to lists of versions")
        parsed_files: dict[str, AvroSchema] = {}
        subjects: dict[str, list[PinnedVersion]] = {}
        for subject, entries in catalog.items():
            if not isinstance(entries, list):
                raise SchemaError(f"{ids_path}: {subject} must be a list of versions")
            versions: list[PinnedVersion] = []
            for entry in entries:
                if (
                    not isinstance(entry, dict)
                    or type(entry.get("id")) is not int
                    or not isinstance(entry.get("file"), str)
                ):
                    raise SchemaError(
                        f'{ids_path}: {subject}: each version needs "id" (int) and "file"'
                    )
                file = entry["file"]
                if file not in parsed_files:
                    try:
                        text = (avro_dir / file).read_text(encoding="utf-8")
                    except OSError as exc:
                        raise SchemaError(f"{subject}: cannot read {file}: {exc}") from exc
                    try:
                        parsed_files[file] = AvroSchema.from_text(text)
                    except SchemaError as exc:
                        raise SchemaError(f"{file}: {exc}") from exc
                schema = parsed_files[file]
                pinned_fp = entry.get("pcf_sha256")
                if pinned_fp is not None and pinned_fp != schema.fingerprint:
                    raise SchemaError(
                        f"{file} no longer matches schema id {entry['id']} of {subject} "
                        f"(fingerprint {schema.fingerprint}, pinned {pinned_fp}): a published "
                        "version must not change its encoding; add a new version instead"
                    )
                versions.append(PinnedVersion(entry["id"], file, schema))
            subjects[subject] = versions
        return cls(subjects)

    @property
    def subjects(self) -> tuple[str, ...]:
        """Every pinned subject."""
        return tuple(self._subjects)

    def versions(self, subject: str) -> tuple[PinnedVersion, ...]:
        """A subject's pinned versions, oldest first. Raises :class:`SchemaError` if unknown."""
        try:
            return self._subjects[subject]
        except KeyError:
            raise SchemaError(f"no schema is pinned for subject {subject}") from None

    def current(self, subject: str) -> AvroSchema:
        """The subject's current (newest) schema: what codecs read and write with."""
        return self.versions(subject)[-1].schema

    def writer_id(self, subject: str, schema: AvroSchema) -> int:
        """The id of the newest pinned version of ``subject`` that encodes like ``schema``.
        Raises :class:`~core.errors.ConfigError` when there is none."""
        for version in reversed(self.versions(subject)):
            if version.schema.canonical_form == schema.canonical_form:
                return version.schema_id
        raise SchemaError(
            f"{schema.fullname} is not pinned for subject {subject}; "
            f"add it to avro/{PINNED_IDS_FILE}"
        )

    def writer_schema(self, subject: str, schema_id: int) -> AvroSchema:
        """The pinned schema of ``schema_id``, if it is one of ``subject``'s versions."""
        found = self._by_id.get(schema_id)
        if found is None:
            raise RejectedEvent(
                DeadLetterReason.UNKNOWN_SCHEMA, f"schema id {schema_id} is not pinned"
            )
        owner, version = found
        if owner != subject:
            raise RejectedEvent(
                DeadLetterReason.UNKNOWN_SCHEMA,
                f"schema id {schema_id} belongs to subject {owner}, not {subject}",
            )
        return version.schema


class RegistrySchemas:
    """Schema ids from a Confluent Schema Registry.

    ``client`` is a ``confluent_kafka.schema_registry.SchemaRegistryClient`` (or an object with
    its ``register_schema``, ``lookup_schema`` and ``get_schema`` methods). For writing, the
    codec's own schema is registered under the subject (``auto_register=True``, idempotent:
    the registry returns the existing id) or looked up (``auto_register=False``); for reading,
    writer schemas are fetched by id. Both are cached for the life of the object (ids are
    immutable in a registry), so the blocking HTTP call happens once per id or subject. An id
    the registry does not know is not cached: it may be registered later.
    """

    def __init__(self, client: Any, *, auto_register: bool = True) -> None:
        self._client = client
        self._auto_register = auto_register
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, AvroSchema] = {}
        self._unusable: dict[int, str] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        auto_register: bool = True,
        client_conf: Mapping[str, Any] | None = None,
    ) -> RegistrySchemas:
        """A resolver for the registry at ``url`` (several URLs may be comma-separated;
        ``client_conf`` adds SchemaRegistryClient settings such as ``basic.auth.user.info``).

        Raises :class:`~core.errors.ConfigError` when the registry client is not installed
        (it needs the ``confluent-kafka[schemaregistry]`` extra).
        """
        try:
            from confluent_kafka.schema_registry import SchemaRegistryClient
        except ImportError as exc:
            raise ConfigError(
                "a schema registry URL is set but confluent-kafka's schema registry client "
                f"cannot be imported ({exc}); install confluent-kafka[schemaregistry] "
                "or unset the registry URL to use the pinned ids"
            ) from exc
        conf = {"url": url, **(client_conf or {})}
        return cls(SchemaRegistryClient(conf), auto_register=auto_register)

    def writer_id(self, subject: str, schema: AvroSchema) -> int:
        key = (subject, schema.canonical_form)
        cached = self._ids.get(key)
        if cached is not None:
            return cached
        from confluent_kafka.schema_registry import Schema

        registry_schema = Schema(schema.text, "AVRO")
        try:
            if self._auto_register:
                schema_id = self._client.register_schema(subject, registry_schema)
            else:
                schema_id = self._client.lookup_schema(subject, registry_schema).schema_id
        except Exception as exc:
            status = getattr(exc, "http_status_code", None)
            if status == 404:
                raise ConfigError(
                    f"{schema.fullname} is not registered under {subject} and "
                    "auto-registration is off; register it first"
                ) from exc
            raise _registry_failure(f"cannot get a schema id for {subject}", exc) from exc
        self._ids[key] = schema_id
        return schema_id

    def writer_schema(self, subject: str, schema_id: int) -> AvroSchema:
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        if schema_id in self._unusable:
            raise RejectedEvent(DeadLetterReason.UNKNOWN_SCHEMA, self._unusable[schema_id])
        try:
            registered = self._client.get_schema(schema_id)
        except Exception as exc:
            if getattr(exc, "http_status_code", None) == 404:
                raise RejectedEvent(
                    DeadLetterReason.UNKNOWN_SCHEMA,
                    f"schema id {schema_id} is not in the schema registry",
                ) from exc
            raise _registry_failure(f"cannot fetch schema id {schema_id}", exc) from exc
        schema_type = getattr(registered, "schema_type", None) or "AVRO"
        if schema_type != "AVRO":
            self._reject_unusable(schema_id, f"schema id {schema_id} is {schema_type}")
        if getattr(registered, "references", None):
            self._reject_unusable(
                schema_id, f"schema id {schema_id} uses schema references (not supported)"
            )
        try:
            schema = AvroSchema.from_text(registered.schema_str)
        except SchemaError as exc:
            self._reject_unusable(schema_id, f"schema id {schema_id}: {exc}")
        self._schemas[schema_id] = schema
        return schema

    def _reject_unusable(self, schema_id: int, detail: str) -> NoReturn:
        self._unusable[schema_id] = detail
        raise RejectedEvent(DeadLetterReason.UNKNOWN_SCHEMA, detail)


def _registry_failure(what: str, exc: Exception) -> MeteringError:
    """Classify a registry client failure: a refusal (4xx other than timeout/throttling) is an
    operator problem; anything else (5xx, network) is infrastructure trouble to retry."""
    status = getattr(exc, "http_status_code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return ConfigError(f"{what}: the schema registry refused: {_one_line(exc)}")
    return RegistryError(f"{what}: {_one_line(exc)}")


# --------------------------------------------------------------------------------------------
# Validation before encoding


class _Invalid(Exception):
    """Internal: a value does not match its schema. ``path`` is filled in on the way out."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []


_Check = Callable[[Any], None]


def _short(fullname: str) -> str:
    return fullname.rsplit(".", 1)[-1]


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"got {type(value).__name__} {text}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_check(bits: int, name: str) -> _Check:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def check(value: Any) -> None:
        if not _is_int(value):
            raise _Invalid(f"expected {name}, {_got(value)}")
        if not low <= value <= high:
            raise _Invalid(f"expected {name}, {value} is out of the {bits}-bit range")

    return check


def _type_check(types: tuple[type, ...], name: str) -> _Check:
    # bool is an int subclass: only a boolean field takes True/False.
    allows_bool = bool in types

    def check(value: Any) -> None:
        if not isinstance(value, types) or (isinstance(value, bool) and not allows_bool):
            raise _Invalid(f"expected {name}, {_got(value)}")

    return check


def _check_null(value: Any) -> None:
    if value is not None:
        raise _Invalid(f"expected null, {_got(value)}")


_PRIMITIVE_CHECKS: dict[str, _Check] = {
    "null": _check_null,
    "boolean": _type_check((bool,), "boolean"),
    "int": _int_check(32, "int"),
    "long": _int_check(64, "long"),
    "float": _type_check((int, float), "float"),
    "double": _type_check((int, float), "double"),
    "string": _type_check((str,), "string"),
    "bytes": _type_check((bytes, bytearray), "bytes"),
}


def _describe(schema: ParsedSchema) -> str:
    if isinstance(schema, str):
        return schema if schema in _PRIMITIVE_CHECKS else _short(schema)
    if isinstance(schema, list):
        return " or ".join(_describe(branch) for branch in schema)
    kind = schema["type"]
    if kind == "enum":
        return f"{_short(schema['name'])} ({'|'.join(schema['symbols'])})"
    if kind in ("record", "fixed"):
        return _short(schema["name"])
    return str(kind)


def _compile(schema: ParsedSchema, named: Mapping[str, Any], done: dict[str, _Check]) -> _Check:
    """Build a checker for ``schema`` (fastavro parsed form). Strict: no coercion, no unknown
    record fields, ints within their range, enum symbols from the schema."""
    if isinstance(schema, str):
        if schema in _PRIMITIVE_CHECKS:
            return _PRIMITIVE_CHECKS[schema]
        if schema in done:  # a named type seen before (or recursion): bind late
            return lambda value: done[schema](value)
        if schema not in named:
            raise SchemaError(f"unknown named type {schema}")
        return _compile(named[schema], named, done)
    if isinstance(schema, list):
        return _compile_union(schema, named, done)
    kind = schema["type"]
    if kind == "record":
        return _compile_record(schema, named, done)
    if kind == "enum":
        symbols = frozenset(schema["symbols"])
        expected = _describe(schema)

        def check_enum(value: Any) -> None:
            if not isinstance(value, str) or value not in symbols:
                raise _Invalid(f"expected {expected}, {_got(value)}")

        done[schema["name"]] = check_enum
        return check_enum
    if kind == "fixed":
        size = schema["size"]

        def check_fixed(value: Any) -> None:
            if not isinstance(value, (bytes, bytearray)) or len(value) != size:
                raise _Invalid(f"expected {size} bytes, {_got(value)}")

        done[schema["name"]] = check_fixed
        return check_fixed
    if kind == "array":
        item_check = _compile(schema["items"], named, done)

        def check_array(value: Any) -> None:
            if not isinstance(value, (list, tuple)):
                raise _Invalid(f"expected array, {_got(value)}")
            for index, item in enumerate(value):
                try:
                    item_check(item)
                except _Invalid as exc:
                    exc.path.insert(0, f"[{index}]")
                    raise

        return check_array
    if kind == "map":
        value_check = _compile(schema["values"], named, done)

        def check_map(value: Any) -> None:
            if not isinstance(value, Mapping):
                raise _Invalid(f"expected map, {_got(value)}")
            for key, item in value.items():
                if not isinstance(key, str):
                    raise _Invalid(f"map keys must be strings, {_got(key)}")
                try:
                    value_check(item)
                except _Invalid as exc:
                    exc.path.insert(0, f"[{key!r}]")
                    raise

        return check_map
    if kind in _PRIMITIVE_CHECKS:  # {"type": "long"}, e.g. once a logical type is removed
        return _PRIMITIVE_CHECKS[kind]
    raise SchemaError(f"unsupported Avro type {kind!r}")


def _compile_record(
    schema: ParsedSchema, named: Mapping[str, Any], done: dict[str, _Check]
) -> _Check:
    name = schema["name"]
    fields: list[tuple[str, _Check, bool]] = []

    def check_record(value: Any) -> None:
        if not isinstance(value, Mapping):
            raise _Invalid(f"expected record {_short(name)}, {_got(value)}")
        present = 0
        for field_name, check, has_default in fields:
            if field_name in value:
                present += 1
                try:
                    check(value[field_name])
                except _Invalid as exc:
                    exc.path.insert(0, field_name)
                    raise
            elif not has_default:
                invalid = _Invalid("missing (the field has no default)")
                invalid.path.append(field_name)
                raise invalid
        if present != len(value):
            unknown = sorted(str(key) for key in value if key not in field_names)
            raise _Invalid(f"unknown field(s) {', '.join(unknown)} for record {_short(name)}")

    done[name] = check_record  # before the fields, so a recursive reference resolves
    for field in schema["fields"]:
        fields.append((field["name"], _compile(field["type"], named, done), "default" in field))
    field_names = frozenset(field_name for field_name, _, _ in fields)
    return check_record


def _compile_union(
    branches: list[Any], named: Mapping[str, Any], done: dict[str, _Check]
) -> _Check:
    checks = [_compile(branch, named, done) for branch in branches]
    records = {
        _resolve_named(branch, named)["name"]: check
        for branch, check in zip(branches, checks, strict=True)
        if _resolve_named(branch, named).get("type") == "record"
    }
    expected = _describe(branches)
    names = "|".join(_short(name) for name in records)
    # With several record branches a bare dict is ambiguous (fastavro would guess): require
    # fastavro's tuple notation (record fullname, fields).
    needs_name = len(records) > 1

    def check_union(value: Any) -> None:
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            record_name, fields = value
            check = records.get(record_name)
            if check is None:
                raise _Invalid(f"unknown record name {record_name!r}, expected one of {names}")
            try:
                check(fields)
            except _Invalid as exc:
                exc.path.insert(0, _short(record_name))
                raise
            return
        if needs_name and isinstance(value, Mapping):
            raise _Invalid(f"expected a (record name, fields) tuple, the name one of {names}")
        for check in checks:
            try:
                check(value)
            except _Invalid:
                continue
            return
        raise _Invalid(f"expected {expected}, {_got(value)}")

    return check_union


def _resolve_named(schema: ParsedSchema, named: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(schema, str):
        resolved = named.get(schema)
        return resolved if isinstance(resolved, dict) else {"type": schema}
    return schema if isinstance(schema, dict) else {"type": "union"}


# --------------------------------------------------------------------------------------------
# Codecs


_Plan = tuple[ParsedSchema, ParsedSchema | None, bool]


def _names_records(schema: ParsedSchema) -> bool:
    """True when a union of ``schema`` can hold a record: only then do decoded records need
    fastavro's ``return_record_name`` (a union branch comes back as ``(name, fields)``).
    Without one the option changes nothing but costs more than the decoding itself (a usage
    event: 21 us with it, 9 us without)."""
    named = schema.get("__named_schemas", {}) if isinstance(schema, dict) else {}

    def is_record(branch: Any) -> bool:
        if isinstance(branch, str):
            branch = named.get(branch, branch)
        return isinstance(branch, dict) and branch.get("type") in ("record", "error")

    def walk(node: Any) -> bool:
        if isinstance(node, list):
            return any(is_record(branch) for branch in node) or any(walk(b) for b in node)
        if isinstance(node, dict):
            kind = node.get("type")
            if kind in ("record", "error"):
                return any(walk(field["type"]) for field in node.get("fields", ()))
            if kind == "array":
                return walk(node.get("items"))
            if kind == "map":
                return walk(node.get("values"))
            return isinstance(kind, (list, dict)) and walk(kind)
        return False

    return walk(schema)


def parse_header(data: bytes | bytearray | memoryview | None) -> int:
    """The schema id of a Confluent wire-format value. Raises
    :class:`~core.errors.RejectedEvent` (``UNDECODABLE``) if the value is not in that format."""
    if data is None or len(data) == 0:
        raise RejectedEvent(DeadLetterReason.UNDECODABLE, "empty message value")
    if len(data) < HEADER_SIZE:
        raise RejectedEvent(
            DeadLetterReason.UNDECODABLE,
            f"{len(data)} byte(s) is shorter than the 5-byte Confluent wire-format header",
        )
    if data[0] != MAGIC_BYTE:
        raise RejectedEvent(
            DeadLetterReason.UNDECODABLE,
            f"magic byte {data[0]:#04x} is not 0x00: not the Confluent wire format",
        )
    return int.from_bytes(data[1:HEADER_SIZE], "big")


class Codec:
    """Encodes and decodes one subject's records in the Confluent wire format.

    Records are plain dicts keyed by the schema's field names; enums are their symbol strings
    (``StrEnum`` members are accepted when encoding), timestamps int epoch milliseconds,
    nullable fields ``None``. Schema ids are resolved on first use and cached; a codec may be
    shared between threads (two threads resolving the same id at once get the same answer).
    """

    def __init__(self, subject: str, schema: AvroSchema, resolver: SchemaResolver) -> None:
        self.subject = subject
        self.schema = schema
        self._resolver = resolver
        self._check = _compile(schema.parsed, schema.parsed.get("__named_schemas", {}), {})
        self._header: bytes | None = None
        # schema id -> (writer schema, reader schema or None when no resolution is needed,
        # whether a union holds a record: see _names_records)
        self._plans: dict[int, _Plan] = {}

    @property
    def writer_id(self) -> int:
        """The schema id this codec frames its records with (resolved on first use)."""
        return int.from_bytes(self._writer_header()[1:], "big")

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """The wire-format bytes of ``record``. Raises :class:`EncodeError` naming the first
        field that does not match the schema (missing without default, wrong type, out of
        range, unknown symbol, unknown field); may raise :class:`RegistryError` or
        :class:`~core.errors.ConfigError` on first use when the schema id cannot be had."""
        record = self._prepare(record)
        try:
            self._check(record)
        except _Invalid as exc:
            where = f"field {'.'.join(exc.path)}: " if exc.path else ""
            raise EncodeError(f"cannot encode {self.subject}: {where}{exc.problem}") from None
        out = io.BytesIO()
        out.write(self._header or self._writer_header())
        try:
            fastavro.schemaless_writer(out, self.schema.parsed, record)
        except Exception as exc:  # validated above, so this is a bug; keep it one line
            raise EncodeError(f"cannot encode {self.subject}: {_one_line(exc)}") from exc
        return out.getvalue()

    def encode_trusted(self, record: Mapping[str, Any]) -> bytes:
        """:meth:`encode` for records the worker built itself from validated values (priced
        events, enforcement events): fastavro still refuses a value of the wrong type, but
        without :meth:`encode`'s field-by-field check first, which costs more than the
        encoding. Raises :class:`EncodeError` on a record that does not fit the schema."""
        out = io.BytesIO()
        out.write(self._header or self._writer_header())
        try:
            fastavro.schemaless_writer(out, self.schema.parsed, self._prepare(record))
        except Exception as exc:
            raise EncodeError(f"cannot encode {self.subject}: {_one_line(exc)}") from exc
        return out.getvalue()

    def decode(self, data: bytes | bytearray | memoryview | None) -> dict[str, Any]:
        """The record in ``data``, resolved to this codec's (current) schema.

        Raises :class:`~core.errors.RejectedEvent`: ``UNDECODABLE`` for anything that is not a
        complete wire-format record (empty, short, wrong magic byte, truncated or garbage
        body, trailing bytes); ``UNKNOWN_SCHEMA`` for an id the resolver does not know, an id
        of another record type or subject, or a writer schema that does not resolve against
        this one. Registry trouble raises :class:`RegistryError` instead.
        """
        if data is None:
            raise RejectedEvent(DeadLetterReason.UNDECODABLE, "message has no value (tombstone)")
        schema_id = parse_header(data)
        plan = self._plans.get(schema_id) or self._plan(schema_id)
        body = io.BytesIO(data)
        body.seek(HEADER_SIZE)
        try:
            record = (
                fastavro.schemaless_reader(
                    body,
                    plan[0],
                    plan[1],
                    return_record_name=True,
                    return_record_name_override=True,
                )
                if plan[2]
                else fastavro.schemaless_reader(body, plan[0], plan[1])
            )
        except SchemaResolutionError as exc:
            raise RejectedEvent(
                DeadLetterReason.UNKNOWN_SCHEMA,
                f"schema id {schema_id} does not resolve against {self.schema.fullname}: "
                f"{_one_line(exc)}",
            ) from exc
        except Exception as exc:  # fastavro fails on garbage with many exception types
            raise RejectedEvent(
                DeadLetterReason.UNDECODABLE,
                f"body is not a valid {_short(self.schema.fullname)} (schema id {schema_id}): "
                f"{_exception_line(exc)}",
            ) from exc
        trailing = len(data) - body.tell()
        if trailing:
            raise RejectedEvent(
                DeadLetterReason.UNDECODABLE,
                f"{trailing} trailing byte(s) after the record (schema id {schema_id})",
            )
        if not isinstance(record, dict):
            raise RejectedEvent(DeadLetterReason.UNDECODABLE, "body is not a record")
        return self._present(record)

    def _writer_header(self) -> bytes:
        if self._header is None:
            schema_id = self._resolver.writer_id(self.subject, self.schema)
            self._header = bytes([MAGIC_BYTE]) + schema_id.to_bytes(4, "big")
        return self._header

    def _plan(self, schema_id: int) -> _Plan:
        writer = self._resolver.writer_schema(self.subject, schema_id)
        if writer.fullname != self.schema.fullname:
            raise RejectedEvent(
                DeadLetterReason.UNKNOWN_SCHEMA,
                f"schema id {schema_id} is a {writer.fullname}, not a {self.schema.fullname}",
            )
        if writer.canonical_form == self.schema.canonical_form:
            plan: _Plan = (self.schema.parsed, None, _names_records(self.schema.parsed))
        else:
            names = _names_records(writer.parsed) or _names_records(self.schema.parsed)
            plan = (writer.parsed, self.schema.parsed, names)
        self._plans[schema_id] = plan
        return plan

    def _prepare(self, record: Mapping[str, Any]) -> Mapping[str, Any]:
        """Hook: turn the caller's record into fastavro's input form."""
        return record

    def _present(self, record: dict[str, Any]) -> dict[str, Any]:
        """Hook: turn fastavro's output into the caller's record form."""
        return record


class ControlCodec(Codec):
    """Codec of control messages. The ``command`` union is a tuple ``(name, fields)`` both
    ways, ``name`` being the record's short name: ``("SetCap", {...})``, ``("SetEnabled",
    {...})``, ``("TopUp", {...})``, ``("SetAutoReload", {...})`` or ``("PeriodTick", {...})``."""

    def __init__(self, subject: str, schema: AvroSchema, resolver: SchemaResolver) -> None:
        super().__init__(subject, schema, resolver)
        command = next(f for f in schema.parsed["fields"] if f["name"] == "command")
        self._fullnames = {_short(branch["name"]): branch["name"] for branch in command["type"]}
        self.command_names: tuple[str, ...] = tuple(self._fullnames)

    def _prepare(self, record: Mapping[str, Any]) -> Mapping[str, Any]:
        command = record.get("command")
        if isinstance(command, tuple) and len(command) == 2 and command[0] in self._fullnames:
            return {**record, "command": (self._fullnames[command[0]], command[1])}
        return record

    def _present(self, record: dict[str, Any]) -> dict[str, Any]:
        command = record.get("command")
        if isinstance(command, tuple):
            record["command"] = (_short(command[0]), command[1])
        return record


@dataclass(frozen=True, slots=True)
class Codecs:
    """One codec per topic. Build it once per process: :meth:`pinned`, :meth:`from_registry`
    or :meth:`create` (registry when a URL is given, else pinned ids).

    ``pause`` and ``billing`` share the pause-event schema but are separate subjects.
    """

    usage: Codec
    priced: Codec
    pause: Codec
    billing: Codec
    control: ControlCodec
    dead_letter: Codec
    replay: Codec

    @classmethod
    def with_resolver(cls, resolver: SchemaResolver, catalog: PinnedSchemas) -> Codecs:
        """Codecs reading and writing the catalog's current schemas, ids from ``resolver``."""

        def codec(subject: Subject) -> Codec:
            return Codec(subject.value, catalog.current(subject.value), resolver)

        return cls(
            usage=codec(Subject.USAGE),
            priced=codec(Subject.PRICED),
            pause=codec(Subject.PAUSES),
            billing=codec(Subject.BILLING),
            control=ControlCodec(
                Subject.CONTROL.value, catalog.current(Subject.CONTROL.value), resolver
            ),
            dead_letter=codec(Subject.DEAD_LETTER),
            replay=codec(Subject.REPLAYS),
        )

    @classmethod
    def pinned(cls, avro_dir: Path = AVRO_DIR) -> Codecs:
        """Codecs using the ids pinned in ``avro_dir``. Raises :class:`SchemaError`."""
        catalog = PinnedSchemas.load(avro_dir)
        return cls.with_resolver(catalog, catalog)

    @classmethod
    def from_registry(
        cls,
        url: str,
        *,
        auto_register: bool = True,
        client_conf: Mapping[str, Any] | None = None,
        avro_dir: Path = AVRO_DIR,
    ) -> Codecs:
        """Codecs whose ids come from the registry at ``url``. Nothing is fetched until the
        first encode or decode. Raises :class:`~core.errors.ConfigError` if the registry
        client is not installed."""
        resolver = RegistrySchemas.from_url(
            url, auto_register=auto_register, client_conf=client_conf
        )
        return cls.with_resolver(resolver, PinnedSchemas.load(avro_dir))

    @classmethod
    def from_settings(cls, settings: Settings) -> Codecs:
        """Codecs for a process: the registry at ``METERING_SCHEMA_REGISTRY_URL`` when it is
        set, else the pinned ids. Raises :class:`~core.errors.ConfigError`."""
        return cls.create(settings.schema_registry_url)

    @classmethod
    def create(cls, schema_registry_url: str | None = None) -> Codecs:
        """Registry codecs when ``schema_registry_url`` is set, else pinned ones (SPEC §3)."""
        if schema_registry_url:
            return cls.from_registry(schema_registry_url)
        return cls.pinned()


# --------------------------------------------------------------------------------------------
# Record helpers


def priced_to_record(
    priced: PricedEvent, source_partition: int, source_offset: int
) -> dict[str, Any]:
    """The ``metering.priced`` record of a priced event read at (partition, offset)."""
    event = priced.event
    usage = event.usage
    return {
        "event_id": event.event_id,
        "occurred_at": event.occurred_at_ms,
        "org_id": event.org_id,
        "plan": event.plan.value,
        "user_id": event.user_id,
        "seat_tier": event.seat_tier.value,
        "product": event.product.value,
        "model": event.model,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "extra_usage": event.extra_usage,
        "model_family": priced.price.model_family,
        "long_context": priced.price.long_context,
        "cost_nano": priced.price.cost_nano,
        "pricing_version": priced.price.pricing_version,
        "revision": priced.revision,
        "source_partition": source_partition,
        "source_offset": source_offset,
    }


def record_to_priced(record: Mapping[str, Any]) -> tuple[PricedEvent, int, int]:
    """The priced event, source partition and source offset of a decoded ``metering.priced``
    record (as returned by ``Codecs.priced.decode``)."""
    # Positional arguments and enum lookups by value: the sink and the replay convert every
    # record they read, and keyword arguments and Enum() calls doubled the cost.
    event = UsageEvent(
        record["event_id"],
        record["occurred_at"],
        record["org_id"],
        _PLANS[record["plan"]],
        record["user_id"],
        _SEAT_TIERS[record["seat_tier"]],
        _PRODUCTS[record["product"]],
        record["model"],
        TokenUsage(
            record["input_tokens"],
            record["output_tokens"],
            record["cache_creation_input_tokens"],
            record["cache_read_input_tokens"],
        ),
        record["extra_usage"],
    )
    price = Price(
        record["model_family"],
        record["pricing_version"],
        record["long_context"],
        record["cost_nano"],
    )
    priced = PricedEvent(event, price, record["revision"])
    return priced, record["source_partition"], record["source_offset"]


_PLANS: Mapping[str, Plan] = {member.value: member for member in Plan}
_SEAT_TIERS: Mapping[str, SeatTier] = {member.value: member for member in SeatTier}
_PRODUCTS: Mapping[str, Product] = {member.value: member for member in Product}


def dead_letter_record(
    *,
    reason: DeadLetterReason,
    detail: str,
    original: bytes | None,
    key: bytes | None,
    source_topic: str,
    source_partition: int,
    source_offset: int,
    dead_lettered_at_ms: int,
) -> dict[str, Any]:
    """The ``metering.dead-letter`` record for a rejected message (SPEC §3): the original value
    truncated past 256 KiB, its whole size and SHA-256, key and source coordinates. A missing
    value (tombstone) is recorded as zero bytes."""
    value = bytes(original or b"")
    return {
        "reason": DeadLetterReason(reason).value,
        "detail": detail,
        "original": value[:MAX_DEAD_LETTER_ORIGINAL_BYTES],
        "original_size": len(value),
        "original_sha256": hashlib.sha256(value).hexdigest(),
        "truncated": len(value) > MAX_DEAD_LETTER_ORIGINAL_BYTES,
        "key": bytes(key) if key is not None else None,
        "source_topic": source_topic,
        "source_partition": source_partition,
        "source_offset": source_offset,
        "dead_lettered_at": dead_lettered_at_ms,
    }


def _exception_line(exc: BaseException) -> str:
    """``exc`` as ``Type: message`` on one line (or just ``Type`` when it has no message)."""
    message = _one_line(exc)
    name = type(exc).__name__
    return name if message == name else f"{name}: {message}"


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line, without fastavro's object reprs (they differ on every run)."""
    text = " ".join(_OBJECT_REPR.sub("", str(exc)).split())
    return text or type(exc).__name__


_OBJECT_REPR = re.compile(r" (?:from|in) <[^>]* at 0x[0-9a-f]+>")
