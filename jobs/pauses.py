"""Reading enforcement events from the beginning (``metering pauses``, SPEC §5, §7).

:func:`read_pauses` reads ``metering.pauses`` (and, when asked, ``metering.billing``) from the
first retained offset of every partition, as an observer: the partitions are assigned
directly (no group membership, so no rebalance of anybody), under a throwaway group id, and no
offset is ever committed. Each record is decoded with the pause-event codec and yielded as the
Avro record (field names of ``avro/pause_event.avsc``, amounts in integer nano-USD, instants
in epoch milliseconds).

Order: each partition's events come in log order, which is the order the worker emitted them
for that partition's organisations; while catching up, partitions are merged by
``emitted_at``, so history reads as one timeline. Without ``follow`` the reader stops once it
has reached the end offsets read when it started; with ``follow`` it then yields new events as
they arrive until ``stop`` is set (or the consumer of the generator closes it).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from core.errors import MeteringError, RejectedEvent

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Message

    from core.settings import Settings
    from streams.codec import Codec, Codecs

PartitionKey = tuple[str, int]


class PauseReadError(MeteringError):
    """The enforcement topics could not be read (Kafka unreachable, topic missing, a record
    that is not a pause event while no ``on_undecodable`` handler was given)."""


def read_pauses(
    settings: Settings,
    follow: bool = False,
    include_billing: bool = False,
    stop: threading.Event | None = None,
    *,
    codecs: Codecs | None = None,
    on_undecodable: Callable[[str], None] | None = None,
    timeout: float = 10.0,
    stall_timeout: float = 30.0,
    poll_interval: float = 0.2,
) -> Iterator[dict[str, Any]]:
    """Yield every enforcement event from the beginning (see the module docstring).

    ``stop`` ends the generator at the next poll (at most ``poll_interval`` seconds later);
    closing the generator ends it too, and the consumer is always closed. A record that does
    not decode is passed to ``on_undecodable`` as one line (topic, partition, offset, reason)
    and skipped; without a handler it raises :class:`PauseReadError`. Raises
    :class:`PauseReadError` when Kafka does not answer within ``timeout``, a topic does not
    exist, or catching up makes no progress for ``stall_timeout`` seconds; registry outages
    propagate as :class:`~streams.codec.RegistryError`.
    """
    from confluent_kafka import Consumer

    from streams.codec import Codecs
    from streams.kafka_config import quiet_client_config
    from streams.topics import BILLING, PAUSES

    codecs = codecs or Codecs.from_settings(settings)
    codec_by_topic = {settings.topic(PAUSES): codecs.pause}
    if include_billing:
        codec_by_topic[settings.topic(BILLING)] = codecs.billing
    consumer = Consumer(
        {
            **quiet_client_config(settings),
            # Never joined or committed: the id only satisfies the client.
            "group.id": f"{settings.app_id}.pauses-reader.{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )
    try:
        yield from _PauseReader(
            settings,
            consumer,
            codec_by_topic,
            follow=follow,
            stop=stop or threading.Event(),
            on_undecodable=on_undecodable,
            timeout=timeout,
            stall_timeout=stall_timeout,
            poll_interval=poll_interval,
        ).events()
    finally:
        consumer.close()


class _PauseReader:
    """The read loop of :func:`read_pauses` over an already configured consumer."""

    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        codec_by_topic: dict[str, Codec],
        *,
        follow: bool,
        stop: threading.Event,
        on_undecodable: Callable[[str], None] | None,
        timeout: float,
        stall_timeout: float,
        poll_interval: float,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.codec_by_topic = codec_by_topic
        self.follow = follow
        self.stop = stop
        self.on_undecodable = on_undecodable
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.poll_interval = poll_interval
        self.ends: dict[PartitionKey, int] = {}
        # Partitions not yet read up to their end offset at start.
        self.pending: set[PartitionKey] = set()
        # Catch-up events per partition, in log order, waiting for the merge.
        self.buffers: dict[PartitionKey, deque[tuple[int, dict[str, Any]]]] = {}
        # Events past the start's end offsets (follow only), in arrival order.
        self.later: deque[dict[str, Any]] = deque()

    def events(self) -> Iterator[dict[str, Any]]:
        self._assign_from_beginning()
        yield from self._catch_up()
        if not self.follow:
            return
        while self.later:
            yield self.later.popleft()
        while not self.stop.is_set():
            for message in self.consumer.consume(500, self.poll_interval):
                if self._is_notice(message):
                    continue
                record = self._decode(message)
                if record is not None:
                    yield record

    # -- setup ------------------------------------------------------------------------------

    def _assign_from_beginning(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

        from streams.kafka_config import unreachable

        topics = sorted(self.codec_by_topic)
        try:
            metadata = self.consumer.list_topics(timeout=self.timeout)
        except KafkaException as exc:
            raise PauseReadError(
                unreachable(
                    self.settings,
                    f"within {self.timeout:.0f}s: {_kafka_error(exc)}",
                    "is it running? (`metering kafka status`, METERING_KAFKA_BOOTSTRAP)",
                    self.consumer,
                )
            ) from None
        assignment: list[TopicPartition] = []
        for topic in topics:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                raise PauseReadError(
                    f"topic {topic} does not exist; the worker creates it on start "
                    "(or run `metering kafka start`)"
                )
            for partition in sorted(found.partitions):
                key = (topic, partition)
                try:
                    low, high = self.consumer.get_watermark_offsets(
                        TopicPartition(topic, partition), timeout=self.timeout
                    )
                except KafkaException as exc:
                    raise PauseReadError(
                        f"could not read the end offsets of {topic}: {_kafka_error(exc)}"
                    ) from None
                self.ends[key] = high
                self.buffers[key] = deque()
                if high > low:
                    self.pending.add(key)
                assignment.append(TopicPartition(topic, partition, OFFSET_BEGINNING))
        self.consumer.assign(assignment)

    # -- catching up ------------------------------------------------------------------------

    def _catch_up(self) -> Iterator[dict[str, Any]]:
        """Everything up to the end offsets read at start, merged across partitions by
        ``emitted_at`` (each partition's own order kept)."""
        last_progress = time.monotonic()
        while self.pending:
            yield from self._merge(final=False)
            if self.stop.is_set():
                return
            messages = self.consumer.consume(500, self.poll_interval)
            if messages:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.stall_timeout:
                behind = ", ".join(f"{topic}[{partition}]" for topic, partition in self.pending)
                raise PauseReadError(
                    f"no progress reading {behind} for {self.stall_timeout:.0f}s; "
                    "is Kafka running? (`metering kafka status`)"
                )
            for message in messages:
                self._take(message)
        yield from self._merge(final=True)

    def _take(self, message: Message) -> None:
        key = (message.topic(), message.partition())
        if self._is_notice(message):
            if _is_partition_eof(message) and message.offset() >= self.ends.get(key, 0):
                self.pending.discard(key)
            return
        offset = message.offset()
        end = self.ends.get(key, 0)
        if offset >= end:  # produced after we started
            self.pending.discard(key)
            if self.follow:
                record = self._decode(message)
                if record is not None:
                    self.later.append(record)
            return
        if offset >= end - 1:
            self.pending.discard(key)
        record = self._decode(message)
        if record is not None:
            self.buffers[key].append((int(record.get("emitted_at") or 0), record))

    def _merge(self, final: bool) -> Iterator[dict[str, Any]]:
        """Yield buffered events in ``emitted_at`` order while that order is certain: every
        partition still catching up has an event buffered (or ``final``)."""
        while True:
            if not final and any(not self.buffers[key] for key in self.pending):
                return
            heads = [(buffer[0][0], key) for key, buffer in self.buffers.items() if buffer]
            if not heads:
                return
            _, key = min(heads)
            yield self.buffers[key].popleft()[1]

    # -- messages ---------------------------------------------------------------------------

    def _is_notice(self, message: Message) -> bool:
        """True for a notice rather than a record (partition EOF, a retriable error that
        librdkafka retries itself); raises :class:`PauseReadError` for any other error."""
        error = message.error()
        if error is None:
            return False
        if _is_partition_eof(message):
            return True
        if error.retriable() and not error.fatal():
            return True
        raise PauseReadError(f"reading {message.topic()} failed: {error.str()}")

    def _decode(self, message: Message) -> dict[str, Any] | None:
        codec = self.codec_by_topic[message.topic()]
        try:
            return codec.decode(message.value())
        except RejectedEvent as exc:
            where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
            if self.on_undecodable is None:
                raise PauseReadError(f"{where} is not a pause event: {exc}") from exc
            self.on_undecodable(f"{where} skipped, not a pause event: {exc}")
            return None


def _is_partition_eof(message: Message) -> bool:
    from confluent_kafka import KafkaError

    error = message.error()
    return error is not None and error.code() == KafkaError._PARTITION_EOF


def _kafka_error(exc: Exception) -> str:
    error = exc.args[0] if exc.args else None
    return error.str() if hasattr(error, "str") else str(exc)
