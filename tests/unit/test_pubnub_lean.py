"""The lean PubNub client's HTTP and subscribe-response reading, against a local asyncio server that
answers the ways real PubNub (or a proxy in front of it) may: chunked, gzip, `Connection: close`."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import pytest

from ingest.transports.pubnub_lean import HttpConnection, MalformedResponse, NoAnswer, parse_subscribe_response

BODY = b'{"t":{"t":"17000000000000001","r":4},"m":[{"c":"ch","d":"QUJD","p":{"t":"17000000000000000","r":4}}]}'

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _twice(answer: Answer) -> tuple[list[tuple[int, bytes]], int]:
    """Two GETs over one `HttpConnection` to a server answering with `answer`: (answers, connections)."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await reader.readuntil(b"\r\n\r\n"):
            await answer(reader, writer)
            if writer.is_closing():
                return

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = HttpConnection(f"127.0.0.1:{port}", None)
    try:
        answers = [await http.get("/v2/subscribe/k/ch/0?tt=1", 5) for _ in range(2)]
    finally:
        http.close()
        server.close()
    return answers, connections


async def _content_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY))


async def _chunked_gzip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = gzip.compress(BODY)
    half = len(data) // 2
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
                 b"%x\r\n%b\r\n%x;ext=1\r\n%b\r\n0\r\n\r\n" % (half, data[:half], len(data) - half, data[half:]))


async def _close_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n{}")
    writer.close()


@pytest.mark.parametrize(("answer", "status", "connections"), [
    (_content_length, 200, 1),  # kept alive
    (_chunked_gzip, 200, 1),
    (_close_after, 403, 2),  # the body ends with the connection; the next request opens another
])
def test_answers_are_read_whole_over_a_kept_connection(answer: Answer, status: int, connections: int) -> None:
    answers, opened = asyncio.run(_twice(answer))
    expected = BODY if status == 200 else b"{}"
    assert answers == [(status, expected)] * 2
    assert opened == connections


def test_a_dropped_connection_is_no_answer() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    with pytest.raises(NoAnswer):
        asyncio.run(_twice(drop))


def test_subscribe_responses_are_parsed_exactly() -> None:
    assert parse_subscribe_response(BODY) == (17000000000000001, 4, [
        {"c": "ch", "d": "QUJD", "p": {"t": "17000000000000000", "r": 4}}])
    # A payload that is not a string goes to the stdlib parser: integers beyond 64 bits stay exact.
    _, _, messages = parse_subscribe_response(b'{"t":{"t":"2","r":1},"m":[{"d":{"n":123456789012345678901234567890}}]}')
    assert messages[0]["d"]["n"] == 123456789012345678901234567890


@pytest.mark.parametrize("body", [b"", b"[1]", b'{"m":[]}', b'{"t":{"t":"x","r":1}}', b'{"t":{"t":"1"},"m":[]}'])
def test_an_answer_without_a_cursor_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedResponse):
        parse_subscribe_response(body)
