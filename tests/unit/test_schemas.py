"""The Avro contract files (``avro/``): they parse, say what SPEC §3/§5 says, agree with the
domain enums, and the pinned-id file guards published versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import fastavro
import pytest

from core.errors import ConfigError, DeadLetterReason
from core.usage import TOKEN_FIELDS, Plan, Product, SeatTier
from streams.codec import AVRO_DIR, PINNED_IDS_FILE, PinnedSchemas, SchemaError, Subject

SCHEMA_FILES = sorted(AVRO_DIR.glob("*.avsc"))


def load(name: str) -> dict[str, Any]:
    return json.loads((AVRO_DIR / name).read_text(encoding="utf-8"))


def fields(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {field["name"]: field for field in schema["fields"]}


def named_types(node: Any) -> dict[str, dict[str, Any]]:
    """Every named type (record, enum, fixed) defined inline in a schema, by short name."""
    found: dict[str, dict[str, Any]] = {}
    if isinstance(node, list):
        for item in node:
            found.update(named_types(item))
    elif isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed"):
            found[node["name"]] = node
        for value in node.values():
            found.update(named_types(value))
    return found


def symbols(schema: dict[str, Any], enum_name: str) -> list[str]:
    return named_types(schema)[enum_name]["symbols"]


def test_the_schema_folder_is_not_a_python_package() -> None:
    # An avro/__init__.py would shadow the `avro` distribution on sys.path.
    assert not (AVRO_DIR / "__init__.py").exists()


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_every_schema_parses(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    parsed = fastavro.parse_schema(schema)
    assert parsed["type"] == "record"
    assert parsed["name"].startswith("metering.v1.")


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_every_record_and_field_is_documented(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    for name, named in named_types(schema).items():
        assert named.get("doc"), f"{path.name}: {name} has no doc"
        for field in named.get("fields", []):
            assert field.get("doc"), f"{path.name}: {name}.{field['name']} has no doc"


def test_pinned_ids_load_and_cover_every_file_and_subject() -> None:
    pinned = PinnedSchemas.load()
    assert set(pinned.subjects) == {subject.value for subject in Subject}
    referenced = {v.file for s in pinned.subjects for v in pinned.versions(s)}
    assert referenced == {path.name for path in SCHEMA_FILES}
    ids = [v.schema_id for s in pinned.subjects for v in pinned.versions(s)]
    assert len(ids) == len(set(ids)), "pinned ids must be unique across subjects"
    assert pinned.versions(Subject.USAGE)[0].schema_id == 1


def test_the_current_version_of_each_subject_is_the_unsuffixed_file() -> None:
    # Frozen older versions are <name>.vN.avsc; the file without a suffix is the current one.
    pinned = PinnedSchemas.load()
    for subject in pinned.subjects:
        assert pinned.versions(subject)[-1].file.count(".") == 1, subject


def test_usage_event_has_exactly_the_spec_fields() -> None:
    schema = load("usage_event.avsc")
    assert schema["name"] == "UsageEvent"
    assert [f["name"] for f in schema["fields"]] == [
        "event_id",
        "occurred_at",
        "org_id",
        "plan",
        "user_id",
        "seat_tier",
        "product",
        "model",
        *TOKEN_FIELDS,
        "extra_usage",
    ]
    by_name = fields(schema)
    assert by_name["occurred_at"]["type"] == {"type": "long", "logicalType": "timestamp-millis"}
    for name in ("event_id", "org_id", "user_id", "model"):
        assert by_name[name]["type"] == "string"
    assert by_name["extra_usage"]["type"] == "boolean"
    # Missing counts must reach the worker (INVALID_FIELD), not fail in the producer.
    for name in TOKEN_FIELDS:
        assert by_name[name]["type"] == ["null", "long"]
        assert by_name[name]["default"] is None


@pytest.mark.parametrize("file", ["usage_event.avsc", "priced_event.avsc"])
def test_enums_match_the_domain_types(file: str) -> None:
    schema = load(file)
    assert symbols(schema, "Plan") == [p.value for p in Plan]
    assert symbols(schema, "SeatTier") == [t.value for t in SeatTier]
    assert symbols(schema, "Product") == [p.value for p in Product]


def test_priced_event_is_the_usage_event_plus_its_price() -> None:
    usage, priced = fields(load("usage_event.avsc")), fields(load("priced_event.avsc"))
    for name, field in usage.items():
        expected = "long" if name in TOKEN_FIELDS else field["type"]
        assert priced[name]["type"] == expected, name
    extra = {name: f["type"] for name, f in priced.items() if name not in usage}
    assert extra == {
        "model_family": "string",
        "long_context": "boolean",
        "cost_nano": "long",
        "pricing_version": "string",
        "revision": "long",
        "source_partition": "int",
        "source_offset": "long",
    }
    assert priced["revision"]["default"] == 0


def test_dead_letter_reasons_are_exactly_the_domain_reasons() -> None:
    schema = load("dead_letter.avsc")
    assert symbols(schema, "DeadLetterReason") == [r.value for r in DeadLetterReason]
    by_name = fields(schema)
    assert by_name["original"]["type"] == "bytes"
    assert by_name["key"]["type"] == ["null", "bytes"]
    assert by_name["source_partition"]["type"] == "int"


def test_pause_event_carries_the_spec_fields_and_reasons() -> None:
    schema = load("pause_event.avsc")
    by_name = fields(schema)
    assert set(by_name) >= {
        "event_id",
        "action",
        "scope",
        "reason",
        "org_id",
        "user_id",
        "period",
        "spend_nano_usd",
        "limit_nano_usd",
        "limit_source",
        "trigger_id",
        "emitted_at",
        "amount_nano_usd",
        "balance_nano_usd",
    }
    assert symbols(schema, "PauseAction") == ["PAUSE", "RESUME", "RELOAD_REQUESTED"]
    assert symbols(schema, "PauseScope") == ["ORG", "USER"]
    assert symbols(schema, "LimitSource") == ["ORG", "SEAT_TIER", "USER", "BALANCE"]
    pause = {"CAP_REACHED", "CAP_LOWERED", "DISABLED", "BALANCE_EXHAUSTED", "REPRICED"}
    resume = {
        "CAP_RAISED",
        "CAP_REMOVED",
        "ENABLED",
        "PERIOD_RESET",
        "BALANCE_TOPPED_UP",
        "REPRICED",
    }
    assert set(symbols(schema, "PauseReason")) == pause | resume | {"BALANCE_LOW"}
    for nullable in ("user_id", "limit_nano_usd", "limit_source", "amount_nano_usd"):
        assert by_name[nullable]["type"][0] == "null"
        assert by_name[nullable]["default"] is None
    assert by_name["emitted_at"]["type"]["logicalType"] == "timestamp-millis"


def test_control_message_commands() -> None:
    schema = load("control_message.avsc")
    commands = fields(schema)["command"]["type"]
    assert [c["name"] for c in commands] == [
        "SetCap",
        "SetEnabled",
        "TopUp",
        "SetAutoReload",
        "PeriodTick",
        "Reprice",
    ]
    assert symbols(schema, "CapScope") == ["ORG", "SEAT_TIER", "USER"]
    assert symbols(schema, "SeatTier") == [t.value for t in SeatTier]
    set_cap = fields(commands[0])
    assert set_cap["limit_nano_usd"]["type"] == ["null", "long"]  # null = unlimited


# -- the pinned-id file guards its versions --------------------------------------------------


@pytest.fixture
def avro_copy(tmp_path: Path) -> Path:
    target = tmp_path / "avro"
    shutil.copytree(AVRO_DIR, target)
    return target


def rewrite_ids(avro_dir: Path, change: Any) -> None:
    path = avro_dir / PINNED_IDS_FILE
    catalog = json.loads(path.read_text())
    change(catalog)
    path.write_text(json.dumps(catalog))


def test_editing_a_published_schema_in_place_is_refused(avro_copy: Path) -> None:
    schema = json.loads((avro_copy / "usage_event.avsc").read_text())
    schema["fields"][0]["type"] = "long"
    (avro_copy / "usage_event.avsc").write_text(json.dumps(schema))
    with pytest.raises(SchemaError, match="add a new version"):
        PinnedSchemas.load(avro_copy)


def test_doc_edits_keep_the_fingerprint(avro_copy: Path) -> None:
    schema = json.loads((avro_copy / "usage_event.avsc").read_text())
    schema["fields"][0]["doc"] = "reworded"
    (avro_copy / "usage_event.avsc").write_text(json.dumps(schema))
    assert PinnedSchemas.load(avro_copy).current(Subject.USAGE).fullname.endswith("UsageEvent")


def test_an_id_pinned_twice_is_refused(avro_copy: Path) -> None:
    def duplicate(catalog: dict[str, Any]) -> None:
        catalog["metering.priced-value"][0]["id"] = 1

    rewrite_ids(avro_copy, duplicate)
    with pytest.raises(SchemaError, match="pinned twice"):
        PinnedSchemas.load(avro_copy)


def test_a_missing_schema_file_is_refused(avro_copy: Path) -> None:
    (avro_copy / "dead_letter.avsc").unlink()
    with pytest.raises(ConfigError, match=r"dead_letter\.avsc"):
        PinnedSchemas.load(avro_copy)


def test_a_subject_mixing_records_is_refused(avro_copy: Path) -> None:
    def mix(catalog: dict[str, Any]) -> None:
        catalog["usage.events-value"].append({"id": 9, "file": "pause_event.avsc"})

    rewrite_ids(avro_copy, mix)
    with pytest.raises(SchemaError, match="mixes record names"):
        PinnedSchemas.load(avro_copy)
