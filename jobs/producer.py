"""Producing usage events (``metering produce`` / ``generate`` / ``demo``).

Records are keyed by ``org_id`` and partitioned with murmur2, like Java and Confluent clients
(librdkafka's default partitioner differs, hence ``murmur2_random``). Delivery is confirmed:
:meth:`UsageProducer.close` flushes and raises if any record was not acknowledged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, Producer

from core.errors import MeteringError
from core.settings import Settings
from streams.codec import Codecs
from streams.topics import USAGE


class ProduceError(MeteringError):
    """Records could not be delivered to Kafka."""


class UsageProducer:
    """Encodes usage events (Confluent wire format) and produces them to ``usage.events``."""

    def __init__(self, settings: Settings, codecs: Codecs | None = None) -> None:
        self.codecs = codecs or Codecs.from_settings(settings)
        self.topic = settings.topic(USAGE)
        self._producer = Producer(
            {
                **settings.kafka_client_config(),
                "partitioner": "murmur2_random",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 20,
                "compression.type": "lz4",
                "batch.num.messages": 10000,
                "queue.buffering.max.messages": 500000,
                # Errors only: the transient "coordinator load in progress" notice of a
                # freshly started broker is not worth an operator's attention.
                "log_level": 3,
            }
        )
        self.delivered = 0
        self.failed: list[str] = []

    def _on_delivery(self, error: KafkaError | None, _message: Any) -> None:
        if error is None:
            self.delivered += 1
        elif len(self.failed) < 10:
            self.failed.append(error.str())
        else:
            self.failed.append("")

    def send_event(self, event: Mapping[str, Any]) -> None:
        """Encode and send one usage record (raises ``EncodeError`` if the schema can't)."""
        self.send_raw(str(event.get("org_id") or "").encode(), self.codecs.usage.encode(event))

    def send_raw(self, key: bytes, value: bytes, partition: int | None = None) -> None:
        """Send bytes as they are (used to inject hostile records in tests and load)."""
        while True:
            try:
                if partition is None:
                    self._producer.produce(self.topic, value, key, on_delivery=self._on_delivery)
                else:
                    self._producer.produce(
                        self.topic, value, key, partition=partition, on_delivery=self._on_delivery
                    )
                break
            except BufferError:
                self._producer.poll(0.1)  # local queue full: wait for deliveries
        self._producer.poll(0)

    def close(self, timeout: float = 60.0) -> int:
        """Flush; returns the number delivered, raises :class:`ProduceError` on any failure."""
        remaining = self._producer.flush(timeout)
        if remaining:
            raise ProduceError(f"{remaining} records were not delivered within {timeout:.0f}s")
        if self.failed:
            reasons = "; ".join(sorted({f for f in self.failed if f}))
            raise ProduceError(f"{len(self.failed)} records were not delivered: {reasons}")
        return self.delivered
