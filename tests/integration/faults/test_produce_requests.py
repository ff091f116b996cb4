"""A produce request lost between the worker and the broker, against a real broker.

The broker is told to advertise a proxy (`LocalKafka.advertised_port`), so that every client connection
goes through it; the proxy forwards Kafka's length-prefixed requests and drops the first Produce request
it is asked to. That is what a loaded machine did now and then in the fault scenarios: a request whose
fate the producer could not know (no answer), followed by a later request that succeeded.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

from confluent_kafka.admin import AdminClient, NewTopic

from ingest.data.sink import KafkaSink, SpecProgress
from ingest.observability.metrics import Metrics
from ingest.sandbox.kafka import LocalKafka, free_port
from tests.support import wait_for
from tests.support.records import numbered_outcome, read_values

PRODUCE_API_KEY = 0
TT = 17_000_000_000_000_000


class DroppingProxy:
    """A TCP proxy for Kafka's protocol that loses the first Produce request after `arm()`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.target = 0  # the broker's real port, set before the first connection
        self.dropped = threading.Event()
        self._armed = False
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def arm(self) -> None:
        self._armed = True

    def close(self) -> None:
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                broker = socket.create_connection(("127.0.0.1", self.target))
                self._sockets += [client, broker]
                threading.Thread(target=self._requests, args=(client, broker), daemon=True).start()
                threading.Thread(target=self._answers, args=(broker, client), daemon=True).start()

    def _requests(self, client: socket.socket, broker: socket.socket) -> None:
        with contextlib.suppress(OSError, EOFError):
            while True:
                size = _read_exactly(client, 4)
                request = _read_exactly(client, struct.unpack(">i", size)[0])
                if struct.unpack(">h", request[:2])[0] == PRODUCE_API_KEY and self._take_drop():
                    continue  # lost on the way: the broker never sees it, the producer never gets an answer
                broker.sendall(size + request)

    def _take_drop(self) -> bool:
        with self._lock:
            if not self._armed or self.dropped.is_set():
                return False
            self.dropped.set()
            return True

    @staticmethod
    def _answers(broker: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := broker.recv(65536):
                client.sendall(data)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


@contextlib.contextmanager
def _broker_behind_a_proxy() -> Iterator[DroppingProxy]:
    """A broker of its own whose every client connection goes through the proxy."""
    proxy = DroppingProxy()
    try:
        broker = LocalKafka(advertised_port=proxy.port)
        proxy.target = broker.port
        with broker:
            yield proxy
    finally:
        proxy.close()



def test_a_lost_produce_request_is_sent_again_before_a_later_one_is_acknowledged(unique_name: str) -> None:
    """The broker has no producer state yet for a new partition, so it accepts a first batch whose
    sequence does not start at 0. librdkafka, seeing a later batch succeed while an earlier one had no
    answer, acknowledges the earlier records too ("implicitly acked by subsequent batch success"):
    with more than one request in flight, the first records of a partition were acknowledged without
    ever reaching Kafka (seen on a loaded machine: the first 1-3 notifications of a channel, delivered
    "without an offset", missing from their topic, and passed by the checkpoint). The sink sends one
    request at a time per connection: the lost one is sent again (after `socket.timeout.ms`) before
    any later one."""
    with _broker_behind_a_proxy() as proxy:
        bootstrap = f"127.0.0.1:{proxy.port}"
        topic = f"{unique_name}.events"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(60)
        # A request without an answer is given up after socket.timeout.ms (default 60 s).
        sink = KafkaSink({"bootstrap.servers": bootstrap, "socket.timeout.ms": "5000"}, Metrics())
        sink.start()
        try:
            progress = SpecProgress("acme/messages")
            proxy.arm()
            for n in range(3):
                sink.send(numbered_outcome(topic, n), progress, TT + n, time.time())
            wait_for(proxy.dropped.is_set, 60, "the first produce request to be lost on the way")
            for n in range(3, 10):
                sink.send(numbered_outcome(topic, n), progress, TT + n, time.time())
            wait_for(lambda: progress.acked_tt == TT + 9, 120, "every record acknowledged")
            values = read_values(bootstrap, topic, 10, timeout=30)
        finally:
            sink.flush(10)
            sink.close()
    assert sink.fatal_error is None
    assert values == [b'{"n":%d}' % n for n in range(10)]  # all of them, once, in order
