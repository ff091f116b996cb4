"""`ingest demo` as a person sees it in a log (stdout piped): title and clock, the faults injected on
purpose, a legend, records while it runs, and a closing summary with what to run next."""

from __future__ import annotations

import subprocess
import sys


def test_demo_view_explains_itself_and_shows_records_while_it_runs(kafka_bootstrap: str, unique_name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ingest", "demo", "--duration", "12", "--bootstrap-servers",
                           kafka_bootstrap, "--prefix", unique_name], capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    live, _, closing = out.partition("what you saw")
    assert "ingest demo: RingCentral push notifications -> Kafka, on this machine" in live
    assert "s elapsed, " in live and "s left" in live
    assert "on purpose: 2% of notifications malformed (-> dead letters); subscriptions live 30s" in live
    assert "legend  published: records written to Kafka" in live
    # Piped, the full frame (subscriptions, records) repeats every 10 s, not only at the end.
    frames = live.split("ingest demo: RingCentral push notifications")
    assert len(frames) >= 3, out  # two while running (0 s and 10 s) and the closing one
    assert "acme/messages" in frames[2] and f"{unique_name}.message-store " in frames[2]
    assert "the worker decrypted and validated them and published" in closing
    assert f"went to {unique_name}.dead-letter: the 2% made malformed on purpose" in closing
    assert "next: run the sandbox and a worker yourself" in closing
    assert "  ingest sandbox --write-config sandbox-worker --rate 20" in closing


def test_demo_over_websocket_shows_records(kafka_bootstrap: str, unique_name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ingest", "demo", "--duration", "12", "--bootstrap-servers",
                           kafka_bootstrap, "--prefix", unique_name, "--transport", "websocket"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    live, _, closing = proc.stdout.partition("what you saw")
    assert "over WebSocket: one connection per account" in live
    frames = live.split("ingest demo: RingCentral push notifications")
    assert len(frames) >= 3, proc.stdout
    assert "acme/all" in frames[2] and f"{unique_name}.message-store " in frames[2]
    assert f"went to {unique_name}.dead-letter" in closing
