"""Config loading: every error names its key, env overrides, secrets never shown."""

from __future__ import annotations

import contextlib
import os
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from ingest.config import Config, ConfigError, load_config
from ingest.observability.logs import redact

REPO = Path(__file__).resolve().parents[2]
CLIENT_SECRET = "cs-very-secret-value-123"
JWT = "eyJhbGciOi.jwt-secret-payload.sig"

BASE = """
kafka:
  bootstrap.servers: 127.0.0.1:9092
ringcentral:
  server: http://127.0.0.1:8080
  client_id: cid
  client_secret_env: RC_SECRET
accounts:
  - name: acme
    jwt_env: ACME_JWT
    subscriptions:
      - name: messages
        event_filters: [/restapi/v1.0/account/~/extension/~/message-store]
"""
ENV = {"RC_SECRET": CLIENT_SECRET, "ACME_JWT": JWT}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str = BASE, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), {**ENV, **(env or {})})


def error(tmp_path: Path, text: str = BASE, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    return str(info.value)


def test_minimal_config_defaults_and_specs(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.kafka == {"bootstrap.servers": "127.0.0.1:9092"}
    assert cfg.topics.prefix == "ringcentral" and cfg.topics.partitions == 6 and cfg.topics.routing == {}
    assert cfg.ringcentral.server == "http://127.0.0.1:8080"
    assert cfg.ringcentral.client_secret == CLIENT_SECRET
    assert cfg.ringcentral.pubnub_origin is None and cfg.ringcentral.pubnub_ssl is True
    assert cfg.accounts[0].jwt == JWT
    assert cfg.worker.renewal_margin_seconds == 120 and cfg.worker.renewal_jitter_seconds == 15
    assert cfg.worker.expires_in_seconds == 900 and cfg.worker.delivery_guarantee == "at-least-once"
    assert cfg.worker.pubnub_client == "lean"
    assert cfg.worker.id  # hostname-pid
    assert cfg.metrics.port == 9095 and cfg.logging.level == "INFO"
    [spec] = cfg.specs()
    assert spec.spec_id == "acme/messages" and spec.account == "acme"
    assert spec.event_filters == ("/restapi/v1.0/account/~/extension/~/message-store",)


def test_example_config_loads() -> None:
    cfg = load_config(REPO / "docs/examples/worker.yaml", {"RC_CLIENT_SECRET": "x" * 20, "ACME_JWT": "a" * 30,
                                                           "GLOBEX_JWT": "g" * 30})
    assert [s.spec_id for s in cfg.specs()] == ["acme/messages", "acme/presence", "globex/telephony"]
    assert cfg.worker.renewal_margin_seconds == 120


def test_secrets_never_in_repr_str_or_errors(tmp_path: Path) -> None:
    text = BASE.replace("  bootstrap.servers: 127.0.0.1:9092", "  bootstrap.servers: 127.0.0.1:9092\n"
                        "  sasl.password: kafka-pass-999")
    cfg = load(tmp_path, text)
    shown = repr(cfg) + str(cfg) + repr(cfg.ringcentral) + repr(cfg.accounts)
    for secret in (CLIENT_SECRET, JWT, "kafka-pass-999"):
        assert secret not in shown
        assert secret not in redact(f"leak {secret}")  # registered with the log redactor
    assert cfg.kafka["sasl.password"] == "kafka-pass-999"
    # An error later in the file must not print the secrets read before it.
    msg = error(tmp_path, BASE + "worker:\n  renewal_margin_seconds: abc\n")
    assert CLIENT_SECRET not in msg and JWT not in msg


def test_secret_from_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text(CLIENT_SECRET + "\n")
    cfg = load(tmp_path, BASE.replace("client_secret_env: RC_SECRET", "client_secret_file: secret.txt"))
    assert cfg.ringcentral.client_secret == CLIENT_SECRET


@pytest.mark.parametrize(("text", "env", "key", "fragment"), [
    (BASE.replace("client_secret_env: RC_SECRET", "client_secret_file: /nonexistent/secret"), {},
     "ringcentral.client_secret_file:", "cannot read"),
    (BASE, {"RC_SECRET": ""}, "ringcentral.client_secret_env:", "is empty"),
    (BASE.replace("jwt_env: ACME_JWT", "jwt_env: NOPE_JWT"), {}, "accounts[0].jwt_env:", "NOPE_JWT is not set"),
    (BASE.replace("    jwt_env: ACME_JWT\n", ""), {}, "accounts[0].jwt_file:", "jwt_env"),
    (BASE.replace("jwt_env: ACME_JWT", "jwt_env: ACME_JWT\n    jwt_file: /x"), {}, "accounts[0].jwt_file:",
     "not both"),
    (BASE.replace("client_secret_env: RC_SECRET", "client_secret: inline-secret-value"), {},
     "ringcentral.client_secret:", "unknown key (did you mean 'client_secret_env'?)"),
    (BASE + "worker:\n  renewal_margn_seconds: 10\n", {}, "worker.renewal_margn_seconds:",
     "did you mean 'renewal_margin_seconds'"),
    (BASE + "wokrer: {}\n", {}, "wokrer:", "did you mean 'worker'"),
    (BASE + "worker:\n  renewal_margin_seconds: abc\n", {}, "worker.renewal_margin_seconds:",
     "expected a number, got a string"),
    (BASE + "worker:\n  expires_in_seconds: 1000\n", {}, "worker.expires_in_seconds:", "at most 900"),
    (BASE + "worker:\n  expires_in_seconds: 60\n", {}, "worker.renewal_margin_seconds:",
     "less than worker.expires_in_seconds"),
    (BASE + "worker:\n  delivery_guarantee: maybe\n", {}, "worker.delivery_guarantee:", "exactly-once"),
    (BASE + "worker:\n  delete_subscriptions_on_shutdown: 'yes please'\n", {},
     "worker.delete_subscriptions_on_shutdown:", "expected a boolean"),
    (BASE + "metrics:\n  port: 70000\n", {}, "metrics.port:", "at most 65535"),
    (BASE + "worker:\n  coordination: mesh\n", {}, "worker.coordination:", "standalone, group"),
    (BASE + "worker:\n  pubnub_client: asyncio\n", {}, "worker.pubnub_client:", "must be one of lean, sdk"),
    (BASE + "topics:\n  spec_partitions: 0\n", {}, "topics.spec_partitions:", "at least 1"),
    (BASE + "metrics:\n  port: 1.5\n", {}, "metrics.port:", "expected an integer"),
    (BASE + "logging:\n  level: LOUD\n", {}, "logging.level:", "must be one of"),
    (BASE + "topics:\n  partitions: 0\n", {}, "topics.partitions:", "at least 1"),
    (BASE + "topics:\n  routing: [a]\n", {}, "topics.routing:", "expected a mapping"),
    (BASE + "topics:\n  prefix: 'bad prefix'\n", {}, "topics.prefix:", "may contain only"),
    (BASE.replace("  bootstrap.servers: 127.0.0.1:9092", "  client.id: x"), {}, "kafka.bootstrap.servers:",
     "missing"),
    (BASE.replace("  bootstrap.servers: 127.0.0.1:9092", "  bootstrap.servers: [a, b]"), {},
     "kafka.bootstrap.servers:", "expected a scalar"),
    (BASE.replace("server: http://127.0.0.1:8080", "server: ftp://x"), {}, "ringcentral.server:", "http(s) URL"),
    (BASE.replace("  client_id: cid\n", ""), {}, "ringcentral.client_id:", "required key is missing"),
    (BASE.replace("[/restapi/v1.0/account/~/extension/~/message-store]", "[]"), {},
     "accounts[0].subscriptions[0].event_filters:", "expected a non-empty list of strings"),
    (BASE.replace("[/restapi/v1.0/account/~/extension/~/message-store]", "/restapi/v1.0/account/~"), {},
     "accounts[0].subscriptions[0].event_filters:", "expected a non-empty list of strings"),
    (BASE.replace("[/restapi/v1.0/account/~/extension/~/message-store]", "[message-store]"), {},
     "accounts[0].subscriptions[0].event_filters[0]:", "API path"),
    (BASE.replace("- name: messages", "- name: 'a/b'"), {}, "accounts[0].subscriptions[0].name:",
     "may contain only"),
    (BASE + "  - name: acme\n    jwt_env: ACME_JWT\n", {}, "accounts[1].name:", "duplicate account name"),
    (BASE.replace("accounts:\n", "accounts: []\nx:\n"), {}, "x:", "unknown key"),
    (BASE.split("accounts:", maxsplit=1)[0], {}, "accounts:", "required"),
    (BASE.replace("ringcentral:", "ringcentral_:"), {}, "ringcentral_:", "did you mean 'ringcentral'"),
])
def test_error_names_exact_key(tmp_path: Path, text: str, env: dict[str, str], key: str, fragment: str) -> None:
    msg = error(tmp_path, text, env)
    assert msg.startswith(key), msg
    assert fragment in msg, msg
    assert CLIENT_SECRET not in msg and JWT not in msg and "inline-secret-value" not in msg


def test_error_in_later_list_item_names_index(tmp_path: Path) -> None:
    text = BASE + textwrap.indent(textwrap.dedent("""\
        - name: globex
          jwt_env: ACME_JWT
          subscriptions:
            - name: ok
              event_filters: [/restapi/v1.0/account/~/presence]
            - name: bad
              event_filters: [/restapi/v1.0/account/~/presence, 5]
        """), "  ")
    assert error(tmp_path, text).startswith("accounts[1].subscriptions[1].event_filters[1]: expected a non-empty "
                                            "string")


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    assert "invalid YAML at line 3" in error(tmp_path, "kafka:\n  - a\n b: [\n")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml", {})


def test_env_overrides(tmp_path: Path) -> None:
    (tmp_path / "jwt").write_text("jwt-from-file-abcdef")
    cfg = load(tmp_path, env={
        "INGEST__WORKER__RENEWAL_MARGIN_SECONDS": "60",
        "INGEST__WORKER__DELETE_SUBSCRIPTIONS_ON_SHUTDOWN": "true",
        "INGEST__WORKER__ID": "w-7",
        "INGEST__KAFKA__SASL_PASSWORD": "123: not yaml",
        "INGEST__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        # librdkafka refuses SASL_SSL with its default mechanism (GSSAPI), and PLAIN without a user name.
        "INGEST__KAFKA__SASL_MECHANISMS": "PLAIN",
        "INGEST__KAFKA__SASL_USERNAME": "ingest",
        "INGEST__TOPICS__ROUTING__MESSAGE_STORE": "rc.sms",
        "INGEST__RINGCENTRAL__PUBNUB_ORIGIN": "127.0.0.1:9999",
        "INGEST__RINGCENTRAL__PUBNUB_SSL": "false",
        "INGEST__METRICS__PORT": "9100",
        "INGEST__LOGGING__LEVEL": "debug",
        "INGEST__ACCOUNTS__0__JWT_FILE": str(tmp_path / "jwt"),  # replaces jwt_env from the file
        "INGEST__ACCOUNTS__0__SUBSCRIPTIONS__0__EVENT_FILTERS": "[/restapi/v1.0/account/~/presence]",
        "INGEST__ACCOUNTS__1__NAME": "globex",
        "INGEST__ACCOUNTS__1__JWT_ENV": "ACME_JWT",
        "OTHER": "ignored",
    })
    assert cfg.worker.renewal_margin_seconds == 60.0 and cfg.worker.delete_subscriptions_on_shutdown is True
    assert cfg.worker.id == "w-7"
    assert cfg.kafka["sasl.password"] == "123: not yaml" and cfg.kafka["security.protocol"] == "SASL_SSL"
    assert "123: not yaml" not in repr(cfg)
    assert cfg.topics.routing == {"message-store": "rc.sms"}
    assert cfg.ringcentral.pubnub_origin == "127.0.0.1:9999" and cfg.ringcentral.pubnub_ssl is False
    assert cfg.metrics.port == 9100 and cfg.logging.level == "DEBUG"
    assert cfg.accounts[0].jwt == "jwt-from-file-abcdef"
    assert cfg.accounts[0].subscriptions[0].event_filters == ("/restapi/v1.0/account/~/presence",)
    assert [a.name for a in cfg.accounts] == ["acme", "globex"] and cfg.accounts[1].jwt == JWT


def test_env_override_errors_name_key_and_variable(tmp_path: Path) -> None:
    msg = error(tmp_path, env={"INGEST__WORKER__RENEWAL_MARGIN_SECONDS": "soon"})
    assert msg.startswith("worker.renewal_margin_seconds: expected a number")
    assert "INGEST__WORKER__RENEWAL_MARGIN_SECONDS" in msg
    msg = error(tmp_path, env={"INGEST__WORKER__MARGIN": "5"})
    assert msg.startswith("worker.margin: unknown key") and "INGEST__WORKER__MARGIN" in msg
    msg = error(tmp_path, env={"INGEST__ACCOUNTS__5__JWT_ENV": "X"})
    assert msg.startswith("accounts:") and "1 item(s)" in msg


def test_relative_event_filters_are_expanded(tmp_path: Path) -> None:
    cfg = load(tmp_path, BASE.replace("[/restapi/v1.0/account/~/extension/~/message-store]",
                                      "[/account/~/extension/~/presence]"))
    assert cfg.specs()[0].event_filters == ("/restapi/v1.0/account/~/extension/~/presence",)


def test_ingest_run_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest.cli import main

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = write(tmp_path, BASE + "worker:\n  expires_in_seconds: 3600\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "worker.expires_in_seconds: must be at most 900" in err
    assert CLIENT_SECRET not in err and JWT not in err


@pytest.mark.parametrize(("env", "key", "fragment"), [
    # NaN passed every range check: the worker never renewed and its subscriptions expired.
    ({"INGEST__WORKER__RENEWAL_MARGIN_SECONDS": ".nan"}, "worker.renewal_margin_seconds:", "finite number, got nan"),
    ({"INGEST__WORKER__CHECKPOINT_INTERVAL_SECONDS": ".inf"}, "worker.checkpoint_interval_seconds:",
     "finite number, got inf"),
    ({"INGEST__WORKER__RENEWAL_JITTER_SECONDS": "1" + "0" * 400}, "worker.renewal_jitter_seconds:",
     "an integer of 401 digits"),
    ({"INGEST__WORKER__SHUTDOWN_TIMEOUT_SECONDS": "1.0e+300"}, "worker.shutdown_timeout_seconds:", "at most 3600"),
    ({"INGEST__WORKER__SESSION_TIMEOUT_SECONDS": "86400"}, "worker.session_timeout_seconds:", "at most 3600"),
    ({"INGEST__TOPICS__PARTITIONS": str(2**31)}, "topics.partitions:", "at most 2147483647"),
    ({"INGEST__METRICS__PORT": "1" + "0" * 400}, "metrics.port:", "an integer of 401 digits"),
    # librdkafka's own validation, at load time instead of a KafkaException traceback at start.
    ({"INGEST__KAFKA__LINGER_MSX": "5"}, "kafka.linger.msx:", 'No such configuration property: "linger.msx"'),
    ({"INGEST__KAFKA__LINGER_MS": "soon"}, "kafka.linger.ms:", "Invalid value"),
    ({"INGEST__KAFKA__LINGER_MS": "nan"}, "kafka.linger.ms:", "finite number, got nan"),
    ({"INGEST__KAFKA__ACKS": "some"}, "kafka.acks:", "Invalid value"),
    ({"INGEST__KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "INGEST__KAFKA__SASL_MECHANISMS": "PLAIN"}, "kafka:",
     "sasl.username and sasl.password must be set"),
    ({"INGEST__KAFKA__SSL_CA_LOCATON": "/etc/ca.pem"}, "kafka.ssl.ca.locaton:", "No such configuration property"),
    # Values and names that made Python itself raise.
    ({"INGEST__METRICS__PORT": "1" * 5000}, "INGEST__METRICS__PORT:", "4300 digits"),
    ({"INGEST__WORKER__ID": "[" * 5000 + "]" * 5000}, "INGEST__WORKER__ID:", "nested too deeply"),
    ({"INGEST__ACCOUNTS__\u00b2__NAME": "x"}, "accounts:", "not a list index"),
    ({"INGEST__ACCOUNTS__" + "1" * 5000 + "__NAME": "x"}, "accounts:", "not a list index"),
])
def test_bad_override_is_a_config_error_naming_the_key(tmp_path: Path, env: dict[str, str], key: str,
                                                      fragment: str) -> None:
    msg = error(tmp_path, env=env)
    assert msg.startswith(key), msg
    assert fragment in msg, msg
    assert "\n" not in msg.strip() and len(msg) < 12_000


def test_librdkafka_accepts_what_it_accepts(tmp_path: Path) -> None:
    """The check refuses nothing librdkafka takes: a consumer property, a client id that reads "nan"."""
    cfg = load(tmp_path, env={"INGEST__KAFKA__LINGER_MS": "5", "INGEST__KAFKA__GROUP_ID": "g",
                              "INGEST__KAFKA__CLIENT_ID": "nan", "INGEST__KAFKA__SASL_PASSWORD": "Infinity"})
    assert cfg.kafka["linger.ms"] == "5" and cfg.kafka["client.id"] == "nan"


def _in_thread(call: Callable[[], object], seconds: float) -> BaseException | None:
    """Run `call` in a daemon thread; the exception it raised, or fail if it is still running."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
@pytest.mark.parametrize("where", ["config", "secret"])
def test_special_files_are_refused_at_once(tmp_path: Path, kind: str, where: str) -> None:
    """A FIFO hung forever on open; /dev/zero was read until memory ran out."""
    special = {"fifo": tmp_path / "fifo", "dev-zero": Path("/dev/zero"), "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(special)
    config = write(tmp_path, BASE.replace("client_secret_env: RC_SECRET", f"client_secret_file: {special}"))
    try:
        raised = _in_thread(lambda: load_config(special if where == "config" else config, ENV), 20)
    finally:
        if kind == "fifo":  # let a reader blocked in open() go
            with contextlib.suppress(OSError):
                os.close(os.open(special, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(raised, ConfigError), raised
    expected = {"fifo": "a FIFO", "dev-zero": "a character device", "directory": "a directory"}[kind]
    msg = str(raised)
    assert msg.startswith(f"{special}: " if where == "config" else "ringcentral.client_secret_file:"), msg
    assert f"not a regular file ({expected})" in msg


@pytest.mark.parametrize(("content", "fragment"), [
    (BASE.encode() + b"# caf\xe9\n", "not UTF-8 text (byte 0xe9"),
    (BASE.encode() + b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    (BASE.encode() + b"metrics:\n  port: " + b"1" * 5000 + b"\n", "4300 digits"),
    (BASE.encode() + b"#" * (2 << 20), "larger than 1048576 bytes"),
])
def test_unreadable_config_file_is_a_config_error_naming_the_file(tmp_path: Path, content: bytes,
                                                                  fragment: str) -> None:
    path = tmp_path / "worker.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    assert str(info.value).startswith(f"{path}: "), info.value
    assert fragment in str(info.value)


def test_oversized_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("s" * (65 << 10))
    msg = error(tmp_path, BASE.replace("client_secret_env: RC_SECRET", "client_secret_file: secret.txt"))
    assert msg.startswith("ringcentral.client_secret_file:") and "larger than 65536 bytes" in msg


@pytest.mark.parametrize("key", ["message.timeout.ms", "delivery.timeout.ms"])
def test_a_message_timeout_is_refused_for_at_least_once(tmp_path: Path, key: str) -> None:
    # A record that times out could only be produced again behind newer records (order lost).
    with_timeout = BASE.replace("  bootstrap.servers: 127.0.0.1:9092", f"  bootstrap.servers: 127.0.0.1:9092\n"
                                f"  {key}: 300000")
    msg = error(tmp_path, with_timeout)
    assert msg.startswith(f"kafka.{key}: must not be set with worker.delivery_guarantee at-least-once"), msg
    assert load(tmp_path, with_timeout.replace("300000", "0")).kafka[key] == "0"  # infinite: what is enforced
    exactly_once = load(tmp_path, with_timeout + "worker:\n  delivery_guarantee: exactly-once\n")
    assert exactly_once.kafka[key] == "300000"  # bounded by transaction.timeout.ms, librdkafka checks it


# ---- transport: pubnub | websocket (issue 19) ----
WEBSOCKET = BASE.replace("    jwt_env: ACME_JWT\n", "    jwt_env: ACME_JWT\n    transport: websocket\n")
SECOND_SUBSCRIPTION = """      - name: presence
        event_filters: [/restapi/v1.0/account/~/extension/~/presence]
"""


def test_transport_defaults_to_pubnub_and_accepts_websocket(tmp_path: Path) -> None:
    assert load(tmp_path).accounts[0].transport == "pubnub"
    assert load(tmp_path, WEBSOCKET).accounts[0].transport == "websocket"
    assert load(tmp_path, BASE, {"INGEST__ACCOUNTS__0__TRANSPORT": "WebSocket"}).accounts[0].transport == "websocket"


def test_unknown_transport_names_the_key(tmp_path: Path) -> None:
    message = error(tmp_path, WEBSOCKET.replace("transport: websocket", "transport: webhooks"))
    assert message.startswith("accounts[0].transport: must be one of pubnub, websocket, got 'webhooks'"), message


def test_websocket_account_has_one_subscription(tmp_path: Path) -> None:
    message = error(tmp_path, WEBSOCKET + SECOND_SUBSCRIPTION)
    assert message.startswith("accounts[0].subscriptions: transport websocket carries one subscription"), message
    assert len(load(tmp_path, BASE + SECOND_SUBSCRIPTION).accounts[0].subscriptions) == 2  # pubnub: any number


def test_ingest_run_exits_2_on_a_bad_transport(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest.cli import main

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = write(tmp_path, WEBSOCKET.replace("transport: websocket", "transport: carrier-pigeon"))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "accounts[0].transport: must be one of pubnub, websocket" in err
    assert len(err.strip().splitlines()) == 1 and CLIENT_SECRET not in err and JWT not in err


def test_websocket_refuses_exactly_once(tmp_path: Path) -> None:
    message = error(tmp_path, WEBSOCKET + "worker:\n  delivery_guarantee: exactly-once\n")
    assert message.startswith("accounts[0].transport: websocket cannot be used with worker.delivery_guarantee "
                              "exactly-once"), message
