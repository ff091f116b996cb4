"""Gaps beyond PubNub's replay buffer are reported, naming the subscription and the time window."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import Producer

from ingest.config import load_config
from ingest.coordination.keywrap import KeyWrapper
from ingest.coordination.state import restore
from ingest.sandbox.server import Sandbox, SandboxSettings
from ingest.topology import TopicNames, partition_for
from ingest.worker.channels import DRAIN_REFUSED_SECONDS
from ingest.worker.runtime import Worker
from tests.support import wait_for
from tests.support.harness import TopicReader, write_config

FILTERS = {"messages": ["/restapi/v1.0/account/~/extension/~/message-store"]}


def _gap_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "replay.gap_suspected"]


def _start(config_path: Path) -> Worker:
    worker = Worker(load_config(config_path))
    worker.start()
    return worker


def _reading(worker: Worker) -> bool:
    return len(worker.intake.pubnub.reading()) == 1


def test_catch_up_that_fills_the_buffer_is_reported(kafka_bootstrap: str, unique_name: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ingest")
    with Sandbox(SandboxSettings(buffer_size=100, pubnub_hold_seconds=0.5, rate_limits=False)) as sandbox:
        path = write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, subscriptions=FILTERS, accounts=1)
        first = _start(path)
        wait_for(lambda: _reading(first), 30, what="the first worker reading")
        first.stop()

        published = sandbox.generator.publish(250)  # while no one reads: PubNub keeps the newest 100
        assert sandbox.pubnub.stats(sandbox.subscriber_key).dropped_overflow >= 150

        second = _start(path)
        reader = TopicReader(kafka_bootstrap, unique_name)
        try:
            records = reader.poll_until(lambda rs: len(rs) >= 100, 30)
            assert {r.headers["uuid"] for r in records} == {g.uuid for g in published[-100:]}
            wait_for(lambda: bool(_gap_events(caplog)), 10, what="the gap report")
            event = _gap_events(caplog)[0]
            assert event["spec"] == "acme/messages" and event["reason"] == "catch-up returned a full replay buffer"
            assert float(str(event["missing_from"])) < published[150].timetoken / 1e7
            assert second.metrics.replay_gaps._value.get() == 1
        finally:
            reader.close()
            second.stop(delete_subscriptions=True)


def test_checkpoint_older_than_the_buffer_is_reported(kafka_bootstrap: str, unique_name: str, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ingest")
    with Sandbox(SandboxSettings(pubnub_hold_seconds=0.5, rate_limits=False)) as sandbox:
        # A 0.2 s "buffer lifetime" makes any restart a gap; the real one is 20 minutes.
        path = write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, subscriptions=FILTERS, accounts=1,
                            worker={"replay_buffer_seconds": 0.2})
        first = _start(path)
        wait_for(lambda: _reading(first), 30, what="the first worker reading")
        assert _gap_events(caplog) == []  # nothing restored yet: no gap
        first.stop()  # writes the final checkpoint
        stopped = time.time()
        wait_for(lambda: time.time() - stopped > 0.2, 5, what="the checkpoint outliving the 0.2 s buffer")
        second = _start(path)
        try:
            events = _gap_events(caplog)
            assert [e["spec"] for e in events] == ["acme/messages"]
            assert events[0]["reason"] == "checkpoint older than the replay buffer"
            assert second.metrics.replay_gaps._value.get() == 1
        finally:
            second.stop(delete_subscriptions=True)


def test_a_recorded_channel_beyond_the_buffer_is_drained_and_its_gap_accounted(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stopped; 250 notifications on the subscription's channel, which rotates at the restarted
    worker's first renewal. PubNub keeps the newest 100: those are read from the old channel with the
    recorded key, and the 150 older ones are exactly the reported window."""
    caplog.set_level(logging.WARNING, logger="ingest")
    with Sandbox(SandboxSettings(buffer_size=100, pubnub_hold_seconds=0.5, rate_limits=False)) as sandbox:
        path = write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, subscriptions=FILTERS, accounts=1)
        first = _start(path)
        wait_for(lambda: _reading(first), 30, what="the first worker reading")
        first.stop()
        [old] = sandbox.rc.live_subscriptions()
        published = sandbox.generator.publish(250)
        sandbox.faults.rotate_on_next_renewal(None, key=True, channel=True)

        second = _start(path)
        reader = TopicReader(kafka_bootstrap, unique_name)
        try:
            records = reader.poll_until(lambda rs: len(rs) >= 100, 30)
            [new] = sandbox.rc.live_subscriptions()
            assert (new.id, new.channel != old.channel, new.key != old.key) == (old.id, True, True)
            assert {r.headers["uuid"] for r in records} == {g.uuid for g in published[-100:]}
            wait_for(lambda: bool(_gap_events(caplog)), 10, what="the gap report")
            [event] = _gap_events(caplog)
            assert (event["spec"], event["subscription_id"]) == ("acme/messages", old.id)
            assert event["reason"] == "catch-up returned a full replay buffer"
            window = (float(str(event["missing_from"])), float(str(event["missing_until"])))
            lost = {g.uuid for g in published if window[0] < g.timetoken / 1e7 < window[1]}
            assert lost == {g.uuid for g in published[:150]}
            assert second.metrics.replay_gaps._value.get() == 1
        finally:
            reader.close()
            second.stop(delete_subscriptions=True)


def test_a_recorded_key_that_no_longer_unwraps_is_a_gap(kafka_bootstrap: str, unique_name: str, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The state record's key was wrapped with a client secret that has been rotated since: the old
    channel cannot be decrypted, so its unread window is reported, with the reason."""
    caplog.set_level(logging.WARNING, logger="ingest")
    with Sandbox(SandboxSettings(pubnub_hold_seconds=0.5, rate_limits=False)) as sandbox:
        path = write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, subscriptions=FILTERS, accounts=1)
        first = _start(path)
        wait_for(lambda: _reading(first), 30, what="the first worker reading")
        first.stop()
        [old] = sandbox.rc.live_subscriptions()
        assert old.key is not None
        state_topic = TopicNames(unique_name).state
        state = restore({"bootstrap.servers": kafka_bootstrap}, state_topic)["acme/messages"]
        previous_secret = KeyWrapper("the previous client secret")
        rotated = replace(state, wrapped_key=previous_secret.wrap(old.key, state.spec_id, old.channel))
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(state_topic, key=state.spec_id.encode(), value=rotated.encode(),
                         partition=partition_for(state.spec_id, load_config(path).topics.spec_partitions))
        assert producer.flush(10) == 0
        sandbox.faults.rotate_on_next_renewal(None, key=True, channel=True)

        second = _start(path)
        try:
            wait_for(lambda: bool(_gap_events(caplog)), DRAIN_REFUSED_SECONDS + 60, what="the gap report")
            [event] = _gap_events(caplog)
            assert (event["spec"], event["subscription_id"]) == ("acme/messages", old.id)
            assert str(event["reason"]).startswith("recorded channel not readable: the wrapped key does not open")
            assert event["missing_from"] == state.timetoken / 1e7
            assert second.metrics.replay_gaps._value.get() == 1
        finally:
            second.stop(delete_subscriptions=True)


def test_a_recorded_channel_pubnub_refuses_is_a_gap_and_the_new_channel_is_read(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """PubNub answers 403 for the former channel (Access Manager): it is given up with a gap report,
    and the new channel, which may share its connection, is read."""
    caplog.set_level(logging.WARNING, logger="ingest")
    with Sandbox(SandboxSettings(pubnub_hold_seconds=0.5, rate_limits=False)) as sandbox:
        path = write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, subscriptions=FILTERS, accounts=1)
        first = _start(path)
        wait_for(lambda: _reading(first), 30, what="the first worker reading")
        first.stop()
        [old] = sandbox.rc.live_subscriptions()
        sandbox.generator.publish(20)
        sandbox.faults.rotate_on_next_renewal(None, key=True, channel=True)
        sandbox.faults.pubnub_error(403, seconds=120, channel=old.channel)

        second = _start(path)
        reader = TopicReader(kafka_bootstrap, unique_name)
        try:
            wait_for(lambda: bool(_gap_events(caplog)), DRAIN_REFUSED_SECONDS + 60, what="the gap report")
            [event] = _gap_events(caplog)
            assert (event["spec"], event["subscription_id"]) == ("acme/messages", old.id)
            assert event["reason"] == "PubNub denied access to the recorded channel"
            wait_for(lambda: old.channel not in second.intake.pubnub.reading() and _reading(second), 30,
                     what="the new channel read without the refused one")
            [probe] = sandbox.generator.publish(1)
            reader.poll_until(lambda rs: any(r.headers.get("uuid") == probe.uuid for r in rs), 30)
            assert any(r.headers.get("uuid") == probe.uuid for r in reader.records)
        finally:
            reader.close()
            second.stop(delete_subscriptions=True)


def test_a_lapse_is_reported_also_when_pubnub_refuses_the_lapsed_channel(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stopped until its subscription expired; started again while PubNub answers 403 to polls of the
    expired subscription's channel (soak seed 3229901450: a one-shot 403 hit the poll that carried three
    such drains). Two losses of one subscription, each reported: what its channel still held unread
    (refused), and the lapse, from its expiry until the new subscription was read, with its length.
    Before, the lapse's window overlapped the refusal's and its report was dropped as the same loss seen
    twice: only the histogram had it."""
    caplog.set_level(logging.WARNING, logger="ingest")
    ttl = 4
    with Sandbox(SandboxSettings(pubnub_hold_seconds=0.5, rate_limits=False, subscription_ttl_max=ttl)) as sandbox:
        path = write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, subscriptions=FILTERS, accounts=1,
                            worker={"expires_in_seconds": ttl, "renewal_margin_seconds": 2})
        first = _start(path)
        wait_for(lambda: _reading(first), 30, what="the first worker reading")
        first.stop()
        [old] = sandbox.rc.live_subscriptions()
        wait_for(lambda: not sandbox.rc.live_subscriptions(), ttl + 30, what="the recorded subscription expired")
        sandbox.faults.pubnub_error(403, seconds=120, channel=old.channel)

        second = _start(path)
        try:
            def reports() -> dict[str, dict[str, object]]:
                return {str(e["reason"]).split(":")[0]: e for e in _gap_events(caplog)
                        if e["subscription_id"] == old.id}

            wait_for(lambda: len(reports()) == 2, DRAIN_REFUSED_SECONDS + 60, what="both losses reported", interval=0.2)
            refused, lapse = reports()["PubNub denied access to the recorded channel"], reports()["subscription lapsed"]
            since, until = float(str(lapse["missing_from"])), float(str(lapse["missing_until"]))
            replacement = next(v for v in sandbox.rc.subscriptions(include_dead=True) if v.id == lapse["replaced_by"])
            assert abs(since - old.expires_at) < 1.5 and until >= replacement.created_at, (lapse, old.expires_at)
            assert float(str(lapse["lapse_seconds"])) == pytest.approx(until - since, abs=0.01)
            assert second.metrics.lapses._sum.get() == pytest.approx(float(str(lapse["lapse_seconds"])), abs=0.01)
            assert second.metrics.replay_gaps._value.get() == 2
            assert refused["spec"] == lapse["spec"] == "acme/messages"
            print(f"lapse of {lapse['lapse_seconds']} s reported beside the refused channel's window "
                  f"({float(str(refused['missing_until'])) - float(str(refused['missing_from'])):.1f} s)")
        finally:
            second.stop(delete_subscriptions=True)
