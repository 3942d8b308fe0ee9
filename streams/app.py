"""The Faust application: ``faust -A streams.app worker`` or ``metering worker``.

Topology (one agent, one partition at a time, in offset order)::

    usage.events ──► meter_usage ──► metering.priced ──► sink (own group) ──► ClickHouse
                         │  ▲
                         │  └── tables: seen (dedupe), totals (month per org/tier/user)
                         ├──► metering.dead-letter   (bad input, with a reason)
                         └──► usage.events           (re-route to the org's partition)

The agent is a thin adapter: decode, validate and meter with the pure core
(:mod:`core.validation`, :class:`core.metering.Meter`), then send what the core decided.
Every table key starts with the org, and an org's events are metered only on the org's
partition, so each key's changelog lives on one partition (FAUST_NOTES).

Failure contract: poison input is dead-lettered and never stops the worker; anything
unexpected is a bug or infrastructure trouble, and the process exits non-zero *without*
acknowledging the event, so the event is processed again after the restart instead of being
skipped (faust#527). Every produced message (outputs and table changelog writes) is tracked
by :class:`streams.delivery.DeliveryGuard`: offsets are committed only after all of them are
acknowledged, and a failed delivery ends the process before any commit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import faust
import orjson
from faust.sensors.monitor import Monitor
from mode import Service

from core.enforcement import (
    Action,
    ControlMessage,
    Enforcer,
    Member,
    PeriodTick,
    SpendLookup,
    Step,
    describe,
)
from core.errors import RejectedEvent
from core.metering import Meter, Status
from core.pricing import PriceTable, default_price_table_path
from core.settings import Settings, load_settings
from core.totals import extra_cost_nano, org_key, user_key
from core.validation import validate_usage
from streams import metrics
from streams.codec import Codecs, dead_letter_record, priced_to_record
from streams.control import RepriceMessage, control_from_record, repriced
from streams.delivery import DeliveryGuard
from streams.diagnostics import consumer_state, partition_states
from streams.fastpath import deliver_directly
from streams.kafka_config import faust_broker_config
from streams.members import (
    PolicyStore,
    StoredPolicy,
    decode_value,
    encode_value,
    policies_first,
)
from streams.output import BatchedOutput
from streams.restore import restore_tables
from streams.state import TableState, flush_outputs_first
from streams.topics import (
    BILLING,
    CONTROL,
    DEAD_LETTER,
    LARGEST_STATE_MESSAGE,
    PAUSES,
    PRICED,
    TABLES,
    USAGE,
    ensure_topics,
    partition_for,
)

log = logging.getLogger(__name__)

PERIOD_TICK_SECONDS = 60.0
POLICY_CACHE_SIZE = 10_000
FETCH_MAX_WAIT_MS = 100  # see short_fetch_wait in create_app
COMMIT_STALL_SECONDS = 120.0  # see check_commits_progress
EXIT_BUG = 70  # EX_SOFTWARE: supervisor restarts us; the event was not acknowledged


def worker_datadir(settings: Settings) -> Path:
    """Local table state (RocksDB) of one worker process.

    Two workers on one machine must differ in ``METERING_WEB_PORT`` anyway, so the port names
    the directory and they never share a RocksDB path.
    """
    return settings.data_path / "worker" / f"{settings.app_id}-{settings.web_port}"


def exit_for_restart(message: str, *args: Any, exc_info: bool = False) -> NoReturn:
    """Log ``message`` (``%`` args) as CRITICAL and end the process at once with
    :data:`EXIT_BUG`: nothing is acknowledged or committed after it, so the supervisor's
    restart resumes from the last commit."""
    log.critical(message, *args, exc_info=exc_info)
    logging.shutdown()
    os._exit(EXIT_BUG)


async def store_or_exit(flush: Callable[[], Awaitable[None]]) -> None:
    """Run the before-commit ``flush``; any failure but cancellation ends the process
    (:func:`exit_for_restart`): the state buffer may be half written, so nothing may be
    processed or committed past it (a graceful stop would commit later totals over it)."""
    try:
        await flush()
    except Exception:
        exit_for_restart("could not store the worker's state before a commit", exc_info=True)


class QuietMonitor(Monitor):
    """Faust's monitor without its per-message bookkeeping (the worker's own Prometheus
    counters in :mod:`streams.metrics` report what operators read); commit, rebalance and
    send statistics are kept."""

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(
        self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None


class MeteringApp(faust.App):
    """A Faust app that creates the pipeline's topics before it subscribes to them."""

    metering_settings: Settings
    metering_caps: Callable[[str], dict[str, Any] | None]
    metering_consumer_state: Callable[[], dict[str, Any]]
    metering_consumer_hooks: list[Callable[[Any], None]]
    metering_tables: list[Any]

    async def on_first_start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ensure_topics, self.metering_settings)
        try:
            # On this thread, on purpose: the RocksDB handles it opens are Faust's from then
            # on (opened from an executor thread, the worker hung closing them at SIGTERM).
            # Nothing else runs yet: the worker has not joined its group.
            restore_tables(self.metering_settings, self.metering_tables)
        except Exception:  # Faust's own recovery restores everything anyway, only slower
            log.warning("bulk restore of the tables failed; Faust recovers them", exc_info=True)
        for hook in self.metering_consumer_hooks:
            hook(self.consumer)  # before the consumer joins its group
        await super().on_first_start()


def create_app(settings: Settings | None = None) -> MeteringApp:
    """Build the worker app for ``settings`` (read from the environment when None)."""
    settings = settings or load_settings()
    partitions = settings.partitions
    worker_datadir(settings).parent.mkdir(parents=True, exist_ok=True)
    app = MeteringApp(
        settings.app_id,
        **faust_broker_config(settings),
        store="rocksdb://",
        datadir=str(worker_datadir(settings)),
        topic_partitions=partitions,
        topic_replication_factor=settings.replication_factor,
        processing_guarantee="at_least_once",
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        web_host=settings.web_bind,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=16384,
        broker_max_poll_records=5000,
        # A SIGKILLed worker's partitions move on after the session timeout: Faust's 60 s
        # default made every crash a minute's stall (benchmarks/recovery.py). 10 s is Kafka's
        # classic default; heartbeats (every 3 s) run on the consumer thread.
        broker_session_timeout=10.0,
        # Faust's 1 MiB per-partition fetch made table recovery read the changelogs in small
        # steps.
        consumer_max_fetch_size=16 * 1024 * 1024,
        Monitor=QuietMonitor,
        producer_linger=0.005,
        producer_max_batch_size=512 * 1024,
        producer_compression_type="lz4",
        # A policy stays small (members have keys of their own), but an input that pauses or
        # resumes thousands of members at once keeps all their events in the org's outbox
        # until 16 later inputs pushed it out: allow it through rather than stop metering.
        producer_max_request_size=LARGEST_STATE_MESSAGE,
        autodiscover=False,
    )
    app.metering_settings = settings
    app.metering_consumer_hooks = []
    codecs = Codecs.from_settings(settings)
    prices = PriceTable.load(settings.price_table or default_price_table_path())

    usage_name = settings.topic(USAGE)
    raw = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    control_name = settings.topic(CONTROL)
    control_topic = app.topic(control_name, partitions=partitions, **raw)
    # One agent reads both: an org's usage and control messages share a partition number and
    # therefore one worker and one set of table partitions.
    source_topics = app.topic(usage_name, control_name, partitions=partitions, **raw)
    source_names = frozenset((usage_name, control_name))

    tables = {
        name: app.Table(
            name, default=None, partitions=partitions, key_type=bytes, value_type=bytes, help=text
        )
        for name, text in TABLES.items()
    }
    app.metering_tables = list(tables.values())
    delivery = DeliveryGuard()
    delivery.install(app)
    output = BatchedOutput(lambda: app.producer._ensure_producer(), delivery.track)
    seen = TableState(tables["seen"], output, orjson.dumps, orjson.loads)
    totals = TableState(tables["totals"], output, orjson.dumps, orjson.loads)
    org_index = TableState(tables["org_index"], output, orjson.dumps, orjson.loads)
    # Policies and, under keys of their own, their members (streams.members); every flush
    # writes the policies first.
    policies: TableState[StoredPolicy | Member] = TableState(
        tables["policies"], output, encode_value, decode_value, order=policies_first
    )
    store = PolicyStore(policies, org_index, POLICY_CACHE_SIZE)
    states = (seen, totals, policies, org_index)
    seen_view, totals_view = seen.view(), totals.view()
    meter = Meter(prices, seen_view, totals_view)
    enforcer = Enforcer(
        grace_ms=int(settings.period_grace_seconds * 1000),
        period_timer=settings.period_timer == "on",
    )

    flushing = asyncio.Lock()

    async def before_commit() -> None:
        """Buffered state and queued outputs reach Kafka before any offset commit, the
        outputs first: the state is taken (``snapshot``), every output queued so far is sent
        and acknowledged, and only then is the state stored and its changelog queued
        (streams.state). One flush at a time (a commit and a revocation may both ask)."""
        async with flushing:
            await store_or_exit(
                lambda: flush_outputs_first(states, output, delivery.settle, store.flushed)
            )

    delivery.before_flush(before_commit)

    @app.task
    async def start_output() -> None:
        output.start()

    usage_out, control_out = usage_name, control_name
    priced_out, dead_letter_out = settings.topic(PRICED), settings.topic(DEAD_LETTER)
    pauses_out, billing_out = settings.topic(PAUSES), settings.topic(BILLING)

    def dead_letter(rejected: RejectedEvent, message: Any, now_ms: int) -> None:
        record = dead_letter_record(
            reason=rejected.reason,
            detail=rejected.detail[:2000],
            original=message.value,
            key=message.key,
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            dead_lettered_at_ms=now_ms,
        )
        output.add(
            dead_letter_out,
            message.partition % partitions,
            message.key,
            codecs.dead_letter.encode_trusted(record),
        )
        metrics.DEAD_LETTERS.labels(rejected.reason.value).inc()

    def rerouted(topic: str, org_id: str, message: Any) -> bool:
        """Forward a message found off its org's partition (keyed wrongly by its producer)
        to that partition, where the org's state lives; True when it was forwarded."""
        home = partition_for(org_id, partitions)
        if home == message.partition:
            return False
        output.add(topic, home, org_id.encode(), message.value)
        metrics.REROUTED.inc()
        return True

    def spend_of(org_id: str, partition: int, read: Callable[..., Any] = totals.get) -> SpendLookup:
        """The core's spend lookup for one org, reading totals with ``read`` (the agent's
        ``get``, or ``peek`` for readers outside it)."""

        def spend(period: str | None, user_id: str | None) -> int:
            if period is None:
                return 0
            key = org_key(org_id, period) if user_id is None else user_key(org_id, period, user_id)
            return extra_cost_nano(read(key, partition))

        return spend

    def caps_of(org_id: str) -> dict[str, Any] | None:
        """What this worker knows of an org's enforcement (``metering caps show``)."""
        partition = partition_for(org_id, partitions)
        policy = store.view(org_id, partition)
        if policy is None:
            return None
        return {"org_id": org_id, **describe(policy, spend_of(org_id, partition, totals.peek))}

    app.metering_caps = caps_of

    def publish(step: Step, org_id: str, partition: int) -> None:
        key = org_id.encode()
        for enforcement_event in step.events:
            if enforcement_event.action is Action.RELOAD_REQUESTED:
                value = codecs.billing.encode_trusted(enforcement_event.record())
                output.add(billing_out, partition, key, value)
            else:
                value = codecs.pause.encode_trusted(enforcement_event.record())
                output.add(pauses_out, partition, key, value)
            metrics.ENFORCEMENT_EVENTS.labels(
                enforcement_event.action.value, enforcement_event.reason.value
            ).inc()

    def enforce_usage(priced: Any, message: Any, now_ms: int) -> None:
        org_id = priced.event.org_id
        partition = message.partition
        policy = store.load(org_id, partition)
        step = enforcer.on_usage(
            policy, priced, message.offset, spend_of(org_id, partition), now_ms
        )
        store.store(org_id, partition, step)
        publish(step, org_id, partition)

    def apply_control(control: ControlMessage, message: Any, now_ms: int) -> None:
        org_id = control.org_id
        partition = message.partition
        policy = store.load(org_id, partition)
        before = store.snapshot(policy)  # the core may half-apply an input it rejects
        try:
            step = enforcer.on_control(
                policy, control, message.offset, spend_of(org_id, partition), now_ms
            )
        except RejectedEvent:
            store.rejected(org_id, partition, before)
            raise
        step.changed = True  # a control message always moves the policy's control offset
        store.store(org_id, partition, step)
        publish(step, org_id, partition)

    def apply_reprice(control: RepriceMessage, message: Any, now_ms: int) -> None:
        """A replay's corrections: new prices into the dedupe records and totals, the
        corrected priced records to the sink, then the enforcer (``REPRICED``)."""
        partition = message.partition
        seen_view.partition = totals_view.partition = partition
        outcome = meter.reprice(control.command.corrections, message.offset)
        key = control.org_id.encode()
        for correction in outcome.applied:
            record = priced_to_record(
                correction.priced, correction.source_partition, correction.source_offset
            )
            output.add(priced_out, partition, key, codecs.priced.encode_trusted(record))
        metrics.REPRICED.inc(len(outcome.applied))
        if outcome.stale:
            metrics.REPRICE_STALE.inc(len(outcome.stale))
            log.warning(
                "replay %s: %d correction(s) for org %s skipped, their old price is not the "
                "one on record (another replay re-priced them?), e.g. event %s",
                control.command.replay_id,
                len(outcome.stale),
                control.org_id,
                outcome.stale[0].priced.event.event_id,
            )
        command = repriced(control.command, outcome.extra_delta_nano)
        try:
            apply_control(control.with_command(command), message, now_ms)
        except RejectedEvent as rejected:
            dead_letter(rejected, message, now_ms)

    def handle_control(message: Any) -> None:
        now_ms = int(time.time() * 1000)
        try:
            control = control_from_record(
                codecs.control.decode(message.value), codecs.priced.decode
            )
        except RejectedEvent as rejected:
            dead_letter(rejected, message, now_ms)
            return
        if isinstance(control, RepriceMessage):
            if not rerouted(control_out, control.org_id, message):
                apply_reprice(control, message, now_ms)
            return
        if isinstance(control.command, PeriodTick) and not control.org_id:
            # A partition-wide tick from the period timer: every org of this partition.
            for org_id in store.orgs(message.partition):
                org_control = ControlMessage(
                    control.message_id, org_id, control.issued_at_ms, control.command
                )
                apply_control(org_control, message, now_ms)
            return
        if rerouted(control_out, control.org_id, message):
            return
        try:
            apply_control(control, message, now_ms)
        except RejectedEvent as rejected:
            dead_letter(rejected, message, now_ms)

    def handle(message: Any) -> None:
        """Everything one source message causes, queued synchronously (no await), so an
        interrupted worker never leaves an event half-handled."""
        if message.topic == control_name:
            handle_control(message)
            return
        now_ms = int(time.time() * 1000)
        metrics.EVENTS_IN.inc()
        try:
            event = validate_usage(codecs.usage.decode(message.value), now_ms)
        except RejectedEvent as rejected:
            dead_letter(rejected, message, now_ms)
            return
        if rerouted(usage_out, event.org_id, message):
            return
        seen_view.partition = totals_view.partition = message.partition
        try:
            outcome = meter.process(event, message.offset)
        except RejectedEvent as rejected:
            dead_letter(rejected, message, now_ms)
            return
        if outcome.status is Status.DUPLICATE:
            metrics.DUPLICATES.inc()
            return
        if outcome.status is Status.REDELIVERED:
            metrics.REDELIVERED.inc()
        else:
            metrics.EVENTS_PRICED.inc()
        assert outcome.priced is not None
        record = priced_to_record(outcome.priced, message.partition, message.offset)
        output.add(
            priced_out,
            message.partition,
            event.org_id.encode(),
            codecs.priced.encode_trusted(record),
        )
        enforce_usage(outcome.priced, message, now_ms)

    if settings.period_timer == "on":

        @app.timer(PERIOD_TICK_SECONDS, on_leader=True)
        async def period_tick() -> None:
            """Deliver the wall clock to every partition (timers cannot write tables)."""
            now_ms = int(time.time() * 1000)
            for partition in range(partitions):
                record = {
                    "message_id": f"tick:{now_ms}:{partition}",
                    "org_id": "",
                    "issued_at": now_ms,
                    "command": ("PeriodTick", {"wall_clock_ms": now_ms}),
                }
                await control_topic.send(
                    key=None, value=codecs.control.encode(record), partition=partition
                )

    # The next offset the agent must see per source partition. Our input topics are neither
    # compacted nor transactional, so offsets are contiguous: a jump means a record was
    # skipped without being processed. Faust can do that around a rebalance (a record whose
    # hand-off was interrupted by the revocation, while records fetched after it are still
    # delivered), and its commit then moves past the skipped one. Exiting before the later
    # record is acknowledged keeps the skipped record uncommitted: it is processed after the
    # restart (tests/integration/test_crash.py, two workers, one killed).
    next_offsets: dict[Any, int] = {}
    # Where each source partition without a committed offset starts (its log start offset).
    start_offsets: dict[Any, int] = {}
    assigned_at = [0.0]  # when the last assignment began (table recovery time)
    app.metering_consumer_state = lambda: consumer_state(app, source_names, next_offsets)

    # A rebalance ends what this worker knew of its partitions: cached policies, expected
    # offsets, and which partitions its buffered state may be written for.
    @app.on_partitions_revoked.connect
    async def on_revoked(*_: Any, **__: Any) -> None:
        held.clear()
        uncommitted_since.clear()
        start_offsets.clear()
        metrics.CONSUMER_LAG.clear()
        store.forget()
        next_offsets.clear()
        for state in states:
            state.revoked()

    @app.on_partitions_assigned.connect
    async def on_assigned(_: Any, assigned: Any = (), **__: Any) -> None:
        assigned_at[0] = time.monotonic()
        next_offsets.clear()
        owned = {tp.partition for tp in assigned if tp.topic in source_names}
        for state in states:
            state.assigned(owned)
        store.forget()  # after the states dropped what they held for other partitions

    def seek_fresh_partitions_to_beginning(consumer: Any) -> None:
        """Make a partition with no committed offset start at its beginning, always.

        Faust fetches records as soon as the fetcher restarts after a rebalance, drops those
        of partitions that are not active yet, then seeks every partition to its committed
        offset (``Consumer.perform_seek``). aiokafka's ``seek_to_committed`` does nothing for
        a partition whose committed offset is missing or 0, so the dropped records were gone
        for good: the records a rebalance found on a never-committed partition were skipped
        (tests/integration/test_crash.py, two workers). Seeking those partitions to the
        beginning refetches them; ``start_offsets`` tells :func:`check_contiguous` where the
        first record must be.
        """
        seek_to_committed = consumer.seek_to_committed
        one_at_a_time = asyncio.Lock()

        async def seek_to_committed_or_beginning() -> Any:
            # Faust seeks when table recovery is complete, and also from its fetch loop when
            # it finds the flow stopped; two seeks may overlap. One at a time, so that each
            # one's offsets (which Faust stores right after this returns) are the newest.
            # When it was asked for, not when its turn came (a rebalance may begin while it
            # waits): see release_sources.
            generation, started = app.consumer_generation_id, hold_clock[0]
            async with one_at_a_time:
                committed = await seek_to_committed()
                fresh = [
                    tp
                    for tp, offset in committed.items()
                    if tp.topic in source_names and not (offset and offset > 0)
                ]
                if fresh:
                    beginnings = await consumer.earliest_offsets(*fresh)
                    await consumer._thread.seek_wait({tp: beginnings[tp] for tp in fresh})
                    start_offsets.update(beginnings)
                release_sources(consumer, generation, started)
                return committed

        consumer.seek_to_committed = seek_to_committed_or_beginning

    app.metering_consumer_hooks.append(seek_fresh_partitions_to_beginning)

    # Source partitions of an assignment, held paused until they are seeked (see
    # hold_sources_until_seeked); the generation whose seek released them; and a clock that
    # ticks when sources are held, so that only a seek begun after the last tick releases.
    held: set[Any] = set()
    seeked_generation = [-1]
    hold_clock = [0]
    held_since = [0.0]  # when the current hold began (time.monotonic)

    def hold_sources_until_seeked(consumer: Any) -> None:
        """Keep an assignment's source partitions paused until their seek is done.

        When table recovery completes, Faust resumes the stream partitions *and then* seeks
        them to their committed offsets (``Recovery.on_recovery_completed``); its fetch loop
        may also have begun a seek of its own when it found the flow stopped. Records were
        processed before the last seek finished, and that seek then stored read and
        committed offsets taken before those records. Traced in
        tests/integration/test_crash.py (two workers, one killed; about one run in three):
        the fetch loop's seek began at .017 s, recovery's at .043 s and finished first
        (.052 s), records were processed, the fetch loop's seek finished at .340 s; every
        record was then processed and acknowledged twice and Faust's commit crept forward
        one offset per second (another time it never moved again). The worker went on with
        its lag frozen. So: seeks run one at a time (:func:`seek_to_committed_or_beginning`),
        and the source partitions resume only when a seek begun after they were held is
        done: no record of an assignment is processed before its positions are final.
        """
        resume = consumer.resume_partitions

        def resume_when_seeked(tps: Any) -> None:
            tps = set(tps)
            if seeked_generation[0] != app.consumer_generation_id:
                sources = {tp for tp in tps if tp.topic in source_names}
                if sources:
                    if not held:
                        held_since[0] = time.monotonic()
                    hold_clock[0] += 1
                    held.update(sources)
                    tps -= sources
            if tps:
                resume(tps)

        consumer.resume_partitions = resume_when_seeked
        consumer.metering_resume_partitions = resume

        # Faust makes a new assignment's partitions active and pauses them a few awaits
        # later; a worker whose flow was not stopped (its previous assignment was empty)
        # could fetch source records in between, before its tables are recovered. They
        # start paused instead.
        assigned_by_faust = consumer.on_partitions_assigned

        async def assigned_paused(assigned: Any, generation_id: int = 0) -> None:
            consumer._paused_partitions.update(tp for tp in assigned if tp.topic in source_names)
            await assigned_by_faust(assigned, generation_id)

        consumer.on_partitions_assigned = assigned_paused

    def release_sources(consumer: Any, generation: int, started: int) -> None:
        """A seek begun in ``generation`` at hold clock ``started`` is done: resume what was
        held if the seek began after the hold did (an earlier seek, from Faust's fetch loop
        say, may have read offsets older than the records about to be processed), unless a
        new rebalance began meanwhile (its own seek releases its partitions)."""
        if generation != app.consumer_generation_id or not held or started < hold_clock[0]:
            return
        seeked_generation[0] = generation
        consumer.metering_resume_partitions(set(held))
        held.clear()
        if assigned_at[0]:  # the assignment's tables are recovered and its streams ready
            metrics.TABLE_RECOVERY_SECONDS.observe(time.monotonic() - assigned_at[0])
            assigned_at[0] = 0.0

    app.metering_consumer_hooks.append(hold_sources_until_seeked)

    def short_fetch_wait(consumer: Any) -> None:
        """Fetch with a short long-poll (:data:`FETCH_MAX_WAIT_MS`) instead of Faust's 1.5 s.

        aiokafka sends no fetch to a broker while any partition it leads still has records
        buffered, so a fetch often covers only partitions without new data (the control
        topic, say) and the broker holds it for the whole wait while usage records pile up
        behind it: at 500 events/s a usage event waited 1.2 s (p50) for its PAUSE, on a
        worker half idle (BENCHMARKS.md, enforcement latency). A short wait bounds that
        stall; an idle worker sends a few more empty fetches.
        """
        thread = consumer._thread
        create = thread._create_worker_consumer

        def create_with_short_wait(*args: Any, **kwargs: Any) -> Any:
            made = create(*args, **kwargs)
            made._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts
            return made

        thread._create_worker_consumer = create_with_short_wait

    app.metering_consumer_hooks.append(short_fetch_wait)

    # Per source partition: (committed offset, since when) while records past it are processed.
    uncommitted_since: dict[Any, tuple[int | None, float]] = {}

    @app.timer(5.0)
    async def report_lag() -> None:
        """``metering_consumer_lag`` per source partition this worker owns, and the commit
        watchdog (:func:`check_commits_progress`)."""
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic not in source_names:
                continue
            position = next_offsets.get(tp)
            if position is None:
                position = consumer._committed_offset.get(tp) or start_offsets.get(tp)
            try:
                high = consumer.highwater(tp)
            except AssertionError:  # revoked on the consumer thread since assignment()
                continue
            if position is not None and high is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(high - position, 0)
                )
        check_commits_progress(consumer, time.monotonic())

    def check_commits_progress(consumer: Any, now: float) -> None:
        """Exit (status 70, restart) when records of a partition processed
        :data:`COMMIT_STALL_SECONDS` ago are still not committed.

        Offsets are committed every second while records are processed, so a committed
        offset that stays behind means Faust's commit bookkeeping for the partition is stuck
        or crawling (both happened after a rebalance, see :func:`hold_sources_until_seeked`:
        once no commit at all, once one offset per second): the worker would go on
        processing with a lag that never falls, and a later restart would redo everything
        since. A restart now resumes from the last commit (reprocessing is idempotent) and
        the stall is in the log instead of silent.
        """
        if held and now - held_since[0] >= COMMIT_STALL_SECONDS:
            # A hold lasts one seek (milliseconds); this one's seek never finished.
            exit_for_restart(
                "source partitions %s are still waiting for their seek after %.0f s; "
                "exiting so that a restart assigns them again",
                sorted(f"{tp.topic}[{tp.partition}]" for tp in held),
                now - held_since[0],
            )
        for tp, processed in list(next_offsets.items()):
            committed = consumer._committed_offset.get(tp)
            if committed is not None and processed <= committed:
                uncommitted_since.pop(tp, None)
                continue
            mark = uncommitted_since.get(tp)
            if mark is None or (committed is not None and committed >= mark[0]):
                uncommitted_since[tp] = (processed, now)  # must be committed in time
            elif now - mark[1] >= COMMIT_STALL_SECONDS:
                exit_for_restart(
                    "%s[%d]: records up to offset %d were processed %.0f s ago but the "
                    "committed offset is still %s; exiting so that a restart resumes from it. "
                    "Consumer state: %s",
                    tp.topic,
                    tp.partition,
                    mark[0] - 1,
                    now - mark[1],
                    committed,
                    orjson.dumps(
                        partition_states(consumer, source_names, next_offsets), default=str
                    ).decode(),
                )

    def check_contiguous(message: Any) -> None:
        tp = message.tp
        expected = next_offsets.get(tp)
        if expected is None:
            expected = app.consumer._committed_offset.get(tp)
            if expected is None:
                expected = start_offsets.get(tp)
        if expected is not None and message.offset > expected:
            exit_for_restart(
                "records %s[%d]@%d..%d were skipped before they were processed; exiting "
                "without committing so they are processed after the restart",
                message.topic,
                message.partition,
                expected,
                message.offset - 1,
            )
        next_offsets[tp] = message.offset + 1

    def process(message: Any) -> None:
        """One source record, start to end (synchronous); exits the process on a bug or
        broken infrastructure, before the record is acknowledged: never skip an event."""
        try:
            check_contiguous(message)
            handle(message)
        except Exception:
            exit_for_restart(
                "unexpected failure on %s[%d]@%d; exiting so the event is retried",
                message.topic,
                message.partition,
                message.offset,
                exc_info=True,
            )

    def direct_delivery(consumer: Any) -> None:
        """Source records go from the fetcher straight to :func:`process`
        (:mod:`streams.fastpath`), skipping Faust's per-record hand-off to the agent."""
        deliver_directly(
            consumer,
            source_names,
            process,
            lambda: output.needs_drain,
            output.drain,
        )

    app.metering_consumer_hooks.append(direct_delivery)

    # The agent is what subscribes the worker to its source topics and co-partitions the
    # tables with them; with direct delivery no record reaches its stream, but one that did
    # would be handled the same way.
    @app.agent(source_topics, concurrency=1, name="meter_usage")
    async def meter_usage(stream: faust.StreamT) -> None:
        async for event in stream.events():
            process(event.message)
            if output.needs_drain:
                await output.drain()

    from streams.web import register_pages

    register_pages(app, settings)
    if settings.embedded_store and settings.worker_sink:
        app.service(_sink_service_class(settings, codecs))
    return app


def _sink_service_class(settings: Settings, codecs: Codecs) -> type[Service]:
    """The in-process sink: started with the worker when it can own the embedded store."""
    from streams.sink_service import SinkService

    class WorkerSink(SinkService):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(settings, codecs, optional=True, **kwargs)

    return WorkerSink


_app: MeteringApp | None = None


def __getattr__(name: str) -> Any:
    """``streams.app.app`` is created on first use, from the environment's settings."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
