"""The worker configuration: YAML file + environment overrides -> a typed, validated `Config`.

Every error is a `ConfigError` whose text starts with the exact key path (`accounts[1].jwt_file: ...`)
so that an operator can fix the file without reading code. Secrets (client secret, JWTs) are read
from files or environment variables, registered with the log redactor, and hidden from `repr`.

Environment overrides: `INGEST__<SECTION>__<KEY>[__<KEY>...]=value`, matched case-insensitively.
List items are addressed by index (`INGEST__ACCOUNTS__0__JWT_ENV`). Inside `kafka` the rest of the
name is one librdkafka property with `_` turned into `.` (`INGEST__KAFKA__SASL_PASSWORD` ->
`sasl.password`); inside `topics.routing` `_` becomes `-` (family names are dashed). Values are
parsed as YAML, so numbers, booleans, `null` and flow lists (`[a, b]`) work.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from confluent_kafka import KafkaException, Producer

from ingest.model import TRANSPORTS, SubscriptionSpec
from ingest.observability.logs import redact, register_secret

ENV_PREFIX = "INGEST__"
MAX_PUBNUB_EXPIRES_IN = 900  # RingCentral caps PubNub subscriptions at 15 minutes
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DELIVERY_GUARANTEES = ("at-least-once", "exactly-once")
COORDINATION_MODES = ("standalone", "group")
# Who reads PubNub: the lean poller (one asyncio loop) or the SDK's threaded client (docs/benchmarks.md).
PUBNUB_CLIENTS = ("lean", "sdk")
# The top-level `transport`: how RingCentral reaches the worker (an account's own `transport`, pubnub or
# websocket, is read by the worker; webhook: RingCentral POSTs to it, for every account).
WORKER_TRANSPORTS = ("pubnub", "webhook")
MAX_WEBHOOK_EXPIRES_IN = 315_360_000  # ten years: RingCentral's maximum for a WebHook subscription
MAX_WEBHOOK_ANSWER_SECONDS = 2.5  # RingCentral waits 3 s for an answer; ours leaves the network half a second
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# librdkafka properties whose values are credentials: scrubbed from logs and hidden from repr.
_KAFKA_SECRET_MARKERS = ("password", "secret", "ssl.key.pem", "sasl.oauthbearer.config", "sasl.jaas.config")
# A worker config is a few KiB and a secret a few hundred bytes: the caps keep a device such as
# /dev/zero, given by mistake, from filling the memory.
MAX_CONFIG_BYTES = 1 << 20
MAX_SECRET_BYTES = 64 << 10
MAX_LIST_INDEX_DIGITS = 6  # an override's list index (`INGEST__ACCOUNTS__0__...`): ASCII digits only
MAX_SECONDS = 3600.0  # upper bound of the timers and timeouts below (librdkafka's session.timeout.ms too)
MAX_PARTITIONS = 2**31 - 1  # Kafka's INT32 partition count
MAX_REPLICATION_FACTOR = 2**15 - 1  # Kafka's INT16 replication factor


class ConfigError(Exception):
    """A configuration problem; `str(e)` begins with the key path at fault."""


def _is_kafka_secret(key: str) -> bool:
    return any(marker in key for marker in _KAFKA_SECRET_MARKERS)


class KafkaProperties(dict[str, str]):
    """librdkafka properties; a plain dict whose repr masks credentials (sasl.password, ...)."""

    def __repr__(self) -> str:
        shown = {k: ("***" if _is_kafka_secret(k) else v) for k, v in self.items()}
        return repr(shown)

    __str__ = __repr__


@dataclass(frozen=True)
class TopicsConfig:
    prefix: str = "ringcentral"
    partitions: int = 6
    replication_factor: int = 1
    routing: dict[str, str] = field(default_factory=dict)  # family -> topic name
    spec_partitions: int = 12  # partitions of the spec and state topics (units of work distribution)


@dataclass(frozen=True)
class RingCentralConfig:
    server: str
    client_id: str
    client_secret: str = field(repr=False)
    pubnub_origin: str | None = None
    pubnub_ssl: bool = True


@dataclass(frozen=True)
class SubscriptionConfig:
    name: str
    event_filters: tuple[str, ...]


@dataclass(frozen=True)
class AccountConfig:
    name: str
    jwt: str = field(repr=False)
    subscriptions: list[SubscriptionConfig] = field(default_factory=list)
    transport: str = "pubnub"  # or "websocket": one connection for the user, carrying its one subscription


@dataclass(frozen=True)
class WorkerConfig:
    id: str
    renewal_margin_seconds: float = 120.0
    renewal_jitter_seconds: float = 15.0
    expires_in_seconds: int = MAX_PUBNUB_EXPIRES_IN
    channels_per_connection: int = 50
    checkpoint_interval_seconds: float = 1.0
    shutdown_timeout_seconds: float = 10.0
    delete_subscriptions_on_shutdown: bool = False
    delivery_guarantee: str = "at-least-once"
    coordination: str = "standalone"  # or "group": share the specs of the spec topic with other workers
    apply_specs_on_start: bool = True  # group mode: write this config's subscriptions to the spec topic
    session_timeout_seconds: float = 10.0  # group mode: a silent worker loses its specs after this
    replay_buffer_seconds: float = 1200.0  # PubNub keeps messages this long; older checkpoints may miss some
    replay_buffer_messages: int = 100  # ... and this many per connection; a full catch-up may have lost some
    pubnub_client: str = "lean"  # who reads PubNub: the lean poller, or the SDK's threaded client ("sdk")


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "0.0.0.0"
    port: int = 9095


@dataclass(frozen=True)
class WebhookConfig:
    """The WebHook receiver (transport: webhook). TLS is terminated in front of it (an ingress)."""

    public_url: str  # what RingCentral reaches: https://host[:port][/prefix], before `path`
    path: str = "/ringcentral/webhook"
    host: str = "0.0.0.0"
    port: int = 8080  # not the metrics port
    max_body_bytes: int = 256 * 1024
    answer_timeout_seconds: float = 2.0
    retry_after_seconds: int = 5
    dedup_window_seconds: float = 600.0
    max_queued_records: int = 10_000
    threads: int = 16

    @property
    def address(self) -> str:
        """The `deliveryMode.address` of every subscription."""
        return self.public_url.rstrip("/") + self.path


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    kafka: dict[str, str]
    topics: TopicsConfig
    ringcentral: RingCentralConfig
    accounts: list[AccountConfig]
    worker: WorkerConfig
    metrics: MetricsConfig
    logging: LoggingConfig
    transport: str = "pubnub"
    webhook: WebhookConfig | None = None  # set when transport is webhook

    def specs(self) -> list[SubscriptionSpec]:
        """The desired subscriptions this file declares; spec ids are "<account>/<subscription>"."""
        return [SubscriptionSpec(spec_id=f"{a.name}/{s.name}", account=a.name, event_filters=s.event_filters)
                for a in self.accounts for s in a.subscriptions]


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, environ: Mapping[str, str] | None = None, *, secrets: bool = True) -> Config:
    """Read, override from the environment and validate. Raises `ConfigError`.

    `secrets=False` is for tools that only read Kafka (`ingest status`): the RingCentral client
    secret and the account JWTs are neither required nor read, and are left empty.
    """
    env = os.environ if environ is None else environ
    path = Path(path)
    raw = _read_mapping(path)
    sources = _apply_env_overrides(raw, env)
    try:
        return _Validator(raw, env, path.parent, read_secrets=secrets).config()
    except ConfigError as exc:
        # Name the environment variable when the faulty value came from one.
        msg = str(exc)
        key = msg.split(":", 1)[0]
        for prefix, var in sources.items():
            if key == prefix or key.startswith((prefix + ".", prefix + "[")) \
                    or prefix.startswith((key + ".", key + "[")):
                raise ConfigError(f"{msg} (set by environment variable {var})") from None
        raise


def load_specs(path: str | Path) -> list[SubscriptionSpec]:
    """A spec file for `ingest apply`: `accounts: [{name, subscriptions: [{name, event_filters}]}]`.

    The same shape as a worker config's accounts, without credentials (workers hold those). A worker
    config can be given too: only its accounts' subscriptions are taken.
    """
    path = Path(path)
    raw = _read_mapping(path)
    v = _Validator(raw, {}, path.parent)
    accounts = raw.get("accounts")
    if not isinstance(accounts, list):
        raise v.fail("accounts", f"expected a list of accounts, got {_type_name(accounts)}")
    specs: list[SubscriptionSpec] = []
    names: set[str] = set()
    for i, item in enumerate(accounts):
        p = f"accounts[{i}]"
        m = v.mapping(item, p, ("name", "subscriptions", "jwt_file", "jwt_env"))
        name = v.name(m, p)
        if name in names:
            raise v.fail(f"{p}.name", f"duplicate account name {name!r}")
        names.add(name)
        for s in v.subscriptions(m.get("subscriptions"), f"{p}.subscriptions"):
            specs.append(SubscriptionSpec(spec_id=f"{name}/{s.name}", account=name, event_filters=s.event_filters))
    return specs


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = _read_text_file(path, MAX_CONFIG_BYTES)
    except ValueError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except (RecursionError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_value_problem(exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {_type_name(raw)}")
    return raw


def _read_text_file(file: Path, limit: int) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes; `ValueError` says why not.

    Opened non-blocking and checked on the open descriptor: a FIFO is refused at once instead of
    waiting forever for a writer, a device (/dev/zero) instead of being read until memory runs out.
    """
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ValueError(f"not a regular file ({_file_kind(mode)})")
    with os.fdopen(fd, "rb") as stream:
        try:
            data = stream.read(limit + 1)
        except OSError as exc:
            raise ValueError(exc.strerror or str(exc)) from None
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _yaml_value_problem(exc: RecursionError | ValueError) -> str:
    """Why PyYAML's constructors gave up: nesting past the recursion limit, an integer past Python's
    4300-digit conversion limit, an impossible date."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";", 1)[0]


def _apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Write `INGEST__...` variables into the raw tree; returns {key path: variable name}."""
    sources: dict[str, str] = {}
    for var in sorted(env):
        if not var.upper().startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in var[len(ENV_PREFIX):].split("__")]
        if not parts or any(not p for p in parts):
            raise ConfigError(f"{var}: malformed override name (expected INGEST__SECTION__KEY)")
        try:
            value = yaml.safe_load(env[var]) if env[var].strip() else ""
        except yaml.YAMLError:
            value = env[var]  # not YAML: take the text as a string
        except (RecursionError, ValueError) as exc:
            raise ConfigError(f"{var}: invalid value: {_yaml_value_problem(exc)}") from None
        section = parts[0]
        if section == "kafka" and len(parts) >= 2:
            # librdkafka takes text; a password must not be reinterpreted as YAML.
            parts, value = ["kafka", ".".join(parts[1:]).replace("_", ".")], env[var]
        elif parts[:2] == ["topics", "routing"] and len(parts) == 3:
            parts = [*parts[:2], parts[2].replace("_", "-")]
        sources[_set_path(raw, parts, value, env, var)] = var
    return sources


def _set_path(raw: dict[str, Any], parts: list[str], value: Any, env: Mapping[str, str], var: str) -> str:
    """Store one override at `parts` (dict keys / list indexes), creating parents; returns the key path."""
    node: Any = raw
    walked: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not _is_list_index(part):
                shown = part if len(part) <= 10 else part[:10] + "..."
                raise ConfigError(f"{_path(walked)}: {var} addresses item {shown!r}, which is not a list index "
                                  f"(at most {MAX_LIST_INDEX_DIGITS} digits 0-9)")
            if int(part) > len(node):
                raise ConfigError(f"{_path(walked)}: {var} addresses item {part}, but the list has "
                                  f"{len(node)} item(s)")
            idx = int(part)
            if idx == len(node):
                node.append({})
            walked.append(f"[{idx}]")
            if last:
                node[idx] = value
            else:
                if not isinstance(node[idx], dict | list):
                    node[idx] = {}
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{_path(walked)}: {var} needs a mapping here, got {_type_name(node)}")
        walked.append(part)
        if last:
            node[part] = value
            _drop_secret_sibling(node, part, env, var)
        else:
            child = node.get(part)
            if not isinstance(child, dict | list):
                child = [] if _is_list_index(parts[i + 1]) else {}
                node[part] = child
            node = child
    return _path(walked)


def _is_list_index(part: str) -> bool:
    """ASCII digits, a few of them: `str.isdigit` also accepts '²' (which `int` refuses) and 5,000 digits."""
    return re.fullmatch(f"[0-9]{{1,{MAX_LIST_INDEX_DIGITS}}}", part) is not None


def _drop_secret_sibling(node: dict[str, Any], key: str, env: Mapping[str, str], var: str) -> None:
    """An override of `jwt_env` replaces a `jwt_file` from the file (and vice versa), instead of
    producing a "both set" error: the environment is how deployments swap secret sources."""
    for base in ("client_secret", "jwt"):
        for mine, other in (("_file", "_env"), ("_env", "_file")):
            if key == base + mine:
                sibling_var = var[: -len(mine)] + other.upper()
                if sibling_var not in env:
                    node.pop(base + other, None)


def _path(parts: list[str]) -> str:
    out = ""
    for p in parts:
        out += p if p.startswith("[") or not out else "." + p
    return out or "<top>"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------------
# Validation


class _Validator:
    def __init__(self, raw: dict[str, Any], env: Mapping[str, str], base_dir: Path, *,
                 read_secrets: bool = True) -> None:
        self.raw = raw
        self.env = env
        self.base_dir = base_dir
        self.read_secrets = read_secrets

    # -- generic helpers ---------------------------------------------------------------------------

    @staticmethod
    def fail(path: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {problem}")

    def mapping(self, value: Any, path: str, known: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {_type_name(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(path, f"keys must be strings, got {_type_name(key)} {key!r}")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
                raise self.fail(_join(path, key), f"unknown key{hint}")
        return value

    def string(self, m: dict[str, Any], key: str, path: str, default: str | None = None, *,
               required: bool = False, nullable: bool = False) -> Any:
        p = _join(path, key)
        if key not in m or (m[key] is None and not nullable):
            if required:
                raise self.fail(p, "required key is missing" if key not in m else "must not be null")
            return default
        v = m[key]
        if v is None:
            return None
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = str(v)  # a YAML number where text is fine (e.g. a client id of digits)
        if not isinstance(v, str):
            raise self.fail(p, f"expected a string, got {_type_name(v)}")
        if not v.strip():
            raise self.fail(p, "must not be empty")
        return v

    def integer(self, m: dict[str, Any], key: str, path: str, default: int, *, lo: int | None = None,
                hi: int | None = None) -> int:
        p = _join(path, key)
        v = m.get(key, default)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(p, f"expected an integer, got {_type_name(v)}")
        self._range(p, v, lo, hi)
        return v

    def number(self, m: dict[str, Any], key: str, path: str, default: float, *, lo: float | None = None,
               hi: float | None = None, exclusive_lo: bool = False) -> float:
        p = _join(path, key)
        v = m.get(key, default)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail(p, f"expected a number, got {_type_name(v)}")
        # NaN passes every comparison below (a NaN renewal margin never renewed); inf is no duration.
        try:
            number = float(v)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise self.fail(p, f"must be a finite number, got {_shown(v)}")
        if exclusive_lo and lo is not None and number <= lo:
            raise self.fail(p, f"must be greater than {lo:g}, got {_shown(v)}")
        self._range(p, number, lo, hi)
        return number

    def _range(self, p: str, v: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and v < lo:
            raise self.fail(p, f"must be at least {_shown(lo)}, got {_shown(v)}")
        if hi is not None and v > hi:
            raise self.fail(p, f"must be at most {_shown(hi)}, got {_shown(v)}")

    def boolean(self, m: dict[str, Any], key: str, path: str, default: bool) -> bool:
        v = m.get(key, default)
        if v is None:
            v = default
        if not isinstance(v, bool):
            raise self.fail(_join(path, key), f"expected a boolean (true/false), got {_type_name(v)}")
        return v

    def choice(self, m: dict[str, Any], key: str, path: str, default: str, *, options: tuple[str, ...],
               normalize: Callable[[str], str] = lambda s: s) -> str:
        v = self.string(m, key, path, default)
        if normalize(v) not in options:
            raise self.fail(_join(path, key), f"must be one of {', '.join(options)}, got {v!r}")
        return normalize(v)

    def secret(self, m: dict[str, Any], base: str, path: str) -> str:
        """Exactly one of `<base>_file` / `<base>_env`; the value is never shown anywhere."""
        if not self.read_secrets:
            return ""
        file_key, env_key = f"{base}_file", f"{base}_env"
        has_file = m.get(file_key) is not None
        has_env = m.get(env_key) is not None
        if has_file and has_env:
            raise self.fail(_join(path, file_key), f"set either {file_key} or {env_key}, not both")
        if not has_file and not has_env:
            raise self.fail(_join(path, file_key), f"required: set {file_key} (a file holding the secret) "
                                                   f"or {env_key} (an environment variable holding it)")
        if has_file:
            name = self.string(m, file_key, path, required=True)
            file = Path(name).expanduser()
            if not file.is_absolute():
                file = self.base_dir / file
            try:
                value = _read_text_file(file, MAX_SECRET_BYTES).strip()
            except ValueError as exc:
                raise self.fail(_join(path, file_key), f"cannot read {str(file)!r}: {exc}") from None
            if not value:
                raise self.fail(_join(path, file_key), f"{str(file)!r} is empty")
        else:
            var = self.string(m, env_key, path, required=True)
            value = (self.env.get(var) or "").strip()
            if var not in self.env:
                raise self.fail(_join(path, env_key), f"environment variable {var} is not set")
            if not value:
                raise self.fail(_join(path, env_key), f"environment variable {var} is empty")
        register_secret(value)
        return value

    # -- sections ----------------------------------------------------------------------------------

    def config(self) -> Config:
        top = self.mapping(self.raw, "<top>", ("kafka", "topics", "ringcentral", "accounts", "worker", "metrics",
                                               "logging", "transport", "webhook"))
        transport = self.choice(top, "transport", "<top>", "pubnub", options=WORKER_TRANSPORTS, normalize=str.lower)
        metrics = self.metrics(top.get("metrics"))
        config = Config(
            kafka=self.kafka(top.get("kafka")),
            topics=self.topics(top.get("topics")),
            ringcentral=self.ringcentral(top.get("ringcentral")),
            accounts=self.accounts(top.get("accounts")),
            worker=self.worker(top.get("worker"), transport),
            metrics=metrics,
            logging=self.logging(top.get("logging")),
            transport=transport,
            webhook=self.webhook(top.get("webhook"), metrics) if transport == "webhook" else None,
        )
        if config.worker.delivery_guarantee == "at-least-once":
            self.no_message_timeout(config.kafka)
        websocket = [i for i, account in enumerate(config.accounts) if account.transport == "websocket"]
        if websocket and config.webhook is not None:
            raise self.fail(f"accounts[{websocket[0]}].transport", "websocket cannot be used with transport: "
                            "webhook (RingCentral POSTs every account's notifications to the receiver)")
        if websocket and config.worker.delivery_guarantee == "exactly-once":
            # An aborted transaction is read again from its checkpoint; a WebSocket cannot be re-read.
            raise self.fail(f"accounts[{websocket[0]}].transport", "websocket cannot be used with "
                            "worker.delivery_guarantee exactly-once (a WebSocket cannot be read again after an "
                            "aborted transaction)")
        return config

    def no_message_timeout(self, kafka: dict[str, str]) -> None:
        """At-least-once records never time out (ingest/sink.py: a record produced again after a
        timeout lands behind newer ones), so a timeout other than 0 (infinite) is refused."""
        for key in ("message.timeout.ms", "delivery.timeout.ms"):
            if key in kafka and kafka[key].strip() != "0":
                raise self.fail(f"kafka.{key}", "must not be set with worker.delivery_guarantee at-least-once: "
                                "records never time out, so that order per spec holds through any Kafka outage "
                                "(docs/records.md)")

    def kafka(self, raw: Any) -> dict[str, str]:
        if raw is None:
            raise self.fail("kafka", "required section is missing (needs at least bootstrap.servers)")
        if not isinstance(raw, dict):
            raise self.fail("kafka", f"expected a mapping of librdkafka properties, got {_type_name(raw)}")
        props = KafkaProperties()
        for key, value in raw.items():
            if not isinstance(key, str):
                raise self.fail("kafka", f"property names must be strings, got {_type_name(key)}")
            p = f"kafka.{key}"
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, float) and not math.isfinite(value):
                raise self.fail(p, f"must be a finite number, got {value:g}")
            elif isinstance(value, int | float | str):
                text = str(value)
            else:
                raise self.fail(p, f"expected a scalar (string, number or boolean), got {_type_name(value)}")
            if _is_kafka_secret(key):
                register_secret(text)
            props[key] = text
        if not props.get("bootstrap.servers", "").strip():
            raise self.fail("kafka.bootstrap.servers", "required property is missing or empty")
        self.librdkafka_accepts(props)
        return props

    def librdkafka_accepts(self, props: dict[str, str]) -> None:
        """librdkafka's own checks (names, types, ranges, combinations), now rather than as a
        `KafkaException` traceback when the worker builds its first client.

        Certificates and keys are checked by name only: alone, with the default plaintext protocol,
        librdkafka reads no file; their content is read when the worker builds its clients.
        """
        material = {key: value for key, value in props.items() if _KAFKA_TLS_MATERIAL.fullmatch(key)}
        for key, value in material.items():
            if (problem := _librdkafka_problem({key: value})) is not None:
                raise self.fail(f"kafka.{key}", problem)
        rest = {key: value for key, value in props.items() if key not in material}
        problem = _librdkafka_problem(rest)
        if problem is None:
            return
        for key, value in rest.items():  # name the property that fails on its own the same way
            if _librdkafka_problem({key: value}) == problem:
                raise self.fail(f"kafka.{key}", problem)
        raise self.fail("kafka", problem)  # only this combination fails (e.g. PLAIN without sasl.username)

    def topics(self, raw: Any) -> TopicsConfig:
        p = "topics"
        m = self.mapping(raw, p, ("prefix", "partitions", "replication_factor", "routing", "spec_partitions"))
        prefix = self.string(m, "prefix", p, "ringcentral")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", prefix):
            raise self.fail(f"{p}.prefix", "may contain only letters, digits, '.', '_' and '-'")
        routing_raw = m.get("routing") or {}
        if not isinstance(routing_raw, dict):
            raise self.fail(f"{p}.routing", f"expected a mapping of family -> topic, got {_type_name(routing_raw)}")
        routing: dict[str, str] = {}
        for family in routing_raw:
            topic = self.string(routing_raw, str(family), f"{p}.routing", required=True)
            if not re.fullmatch(r"[A-Za-z0-9._-]+", topic):
                raise self.fail(f"{p}.routing.{family}", f"{topic!r} is not a valid Kafka topic name")
            routing[str(family)] = topic
        return TopicsConfig(prefix=prefix, partitions=self.integer(m, "partitions", p, 6, lo=1, hi=MAX_PARTITIONS),
                            replication_factor=self.integer(m, "replication_factor", p, 1, lo=1,
                                                            hi=MAX_REPLICATION_FACTOR), routing=routing,
                            spec_partitions=self.integer(m, "spec_partitions", p, 12, lo=1, hi=MAX_PARTITIONS))

    def ringcentral(self, raw: Any) -> RingCentralConfig:
        p = "ringcentral"
        if raw is None:
            raise self.fail(p, "required section is missing")
        m = self.mapping(raw, p, ("server", "client_id", "client_secret_file", "client_secret_env", "pubnub_origin",
                                  "pubnub_ssl"))
        server = self.string(m, "server", p, "https://platform.ringcentral.com").rstrip("/")
        url = urlparse(server)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise self.fail(f"{p}.server", f"expected an http(s) URL such as https://platform.ringcentral.com, "
                                           f"got {server!r}")
        origin = self.string(m, "pubnub_origin", p, None, nullable=True)
        if origin is not None and ("/" in origin or " " in origin):
            raise self.fail(f"{p}.pubnub_origin", f"expected host[:port] without scheme or path, got {origin!r}")
        return RingCentralConfig(server=server, client_id=self.string(m, "client_id", p, required=True),
                                 client_secret=self.secret(m, "client_secret", p), pubnub_origin=origin,
                                 pubnub_ssl=self.boolean(m, "pubnub_ssl", p, True))

    def accounts(self, raw: Any) -> list[AccountConfig]:
        if raw is None:
            raise self.fail("accounts", "required: a list of accounts (name, jwt_file or jwt_env, subscriptions)")
        if not isinstance(raw, list) or not raw:
            raise self.fail("accounts", f"expected a non-empty list of accounts, got {_type_name(raw)}"
                            + (" (empty)" if raw == [] else ""))
        out: list[AccountConfig] = []
        seen: set[str] = set()
        for i, item in enumerate(raw):
            p = f"accounts[{i}]"
            if item is None:
                raise self.fail(p, "expected a mapping, got null")
            m = self.mapping(item, p, ("name", "jwt_file", "jwt_env", "subscriptions", "transport"))
            name = self.name(m, p)
            if name in seen:
                raise self.fail(f"{p}.name", f"duplicate account name {name!r}")
            seen.add(name)
            jwt = self.secret(m, "jwt", p)
            transport = self.choice(m, "transport", p, "pubnub", options=TRANSPORTS, normalize=str.lower)
            subscriptions = self.subscriptions(m.get("subscriptions"), f"{p}.subscriptions")
            if transport == "websocket" and len(subscriptions) > 1:
                raise self.fail(f"{p}.subscriptions", "transport websocket carries one subscription per account "
                                "(one connection per user session): put all its event_filters in one subscription")
            out.append(AccountConfig(name=name, jwt=jwt, subscriptions=subscriptions, transport=transport))
        return out

    def name(self, m: dict[str, Any], p: str) -> str:
        name: str = self.string(m, "name", p, required=True)
        if not NAME_RE.fullmatch(name):
            raise self.fail(f"{p}.name", f"{name!r} may contain only letters, digits, '.', '_' and '-' "
                                         "(it becomes part of the spec id '<account>/<subscription>')")
        return name

    def subscriptions(self, raw: Any, path: str) -> list[SubscriptionConfig]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise self.fail(path, f"expected a list of subscriptions, got {_type_name(raw)}")
        out: list[SubscriptionConfig] = []
        seen: set[str] = set()
        for j, item in enumerate(raw):
            p = f"{path}[{j}]"
            if item is None:
                raise self.fail(p, "expected a mapping, got null")
            m = self.mapping(item, p, ("name", "event_filters"))
            name = self.name(m, p)
            if name in seen:
                raise self.fail(f"{p}.name", f"duplicate subscription name {name!r} in this account")
            seen.add(name)
            filters = m.get("event_filters")
            bad = "expected a non-empty list of strings"
            if not isinstance(filters, list) or not filters:
                raise self.fail(f"{p}.event_filters", bad)
            normalized: list[str] = []
            for k, item_filter in enumerate(filters):
                if not isinstance(item_filter, str) or not item_filter.strip():
                    raise self.fail(f"{p}.event_filters[{k}]",
                                    f"expected a non-empty string, got {_type_name(item_filter)}")
                f = item_filter.strip()
                if not f.startswith("/"):
                    raise self.fail(f"{p}.event_filters[{k}]",
                                    f"expected an API path such as /restapi/v1.0/account/~/extension/~/message-store, "
                                    f"got {f!r}")
                if f.startswith(("/account/", "/subscription/")):
                    f = "/restapi/v1.0" + f  # relative form, expanded as the SDKs do
                normalized.append(f)
            out.append(SubscriptionConfig(name=name, event_filters=tuple(normalized)))
        return out

    def worker(self, raw: Any, transport: str = "pubnub") -> WorkerConfig:
        p, d = "worker", WorkerConfig  # the defaults are the dataclass's, written once
        m = self.mapping(raw, p, ("id", "renewal_margin_seconds", "renewal_jitter_seconds", "expires_in_seconds",
                                  "channels_per_connection", "checkpoint_interval_seconds",
                                  "shutdown_timeout_seconds", "delete_subscriptions_on_shutdown",
                                  "delivery_guarantee", "coordination", "apply_specs_on_start",
                                  "session_timeout_seconds", "replay_buffer_seconds", "replay_buffer_messages",
                                  "pubnub_client"))
        worker_id = self.string(m, "id", p, None, nullable=True) or f"{socket.gethostname()}-{os.getpid()}"
        longest = MAX_WEBHOOK_EXPIRES_IN if transport == "webhook" else MAX_PUBNUB_EXPIRES_IN
        expires_in = self.integer(m, "expires_in_seconds", p, d.expires_in_seconds, lo=1, hi=longest)
        margin = self.number(m, "renewal_margin_seconds", p, d.renewal_margin_seconds, lo=0, exclusive_lo=True)
        if margin >= expires_in:
            raise self.fail(f"{p}.renewal_margin_seconds",
                            f"must be less than worker.expires_in_seconds ({expires_in}), got {margin:g}")
        return WorkerConfig(
            id=worker_id,
            renewal_margin_seconds=margin,
            renewal_jitter_seconds=self.number(m, "renewal_jitter_seconds", p, d.renewal_jitter_seconds, lo=0,
                                               hi=MAX_SECONDS),
            expires_in_seconds=expires_in,
            channels_per_connection=self.integer(m, "channels_per_connection", p, d.channels_per_connection, lo=1),
            checkpoint_interval_seconds=self.number(m, "checkpoint_interval_seconds", p, d.checkpoint_interval_seconds,
                                                    lo=0, hi=MAX_SECONDS, exclusive_lo=True),
            shutdown_timeout_seconds=self.number(m, "shutdown_timeout_seconds", p, d.shutdown_timeout_seconds, lo=0,
                                                 hi=MAX_SECONDS),
            delete_subscriptions_on_shutdown=self.boolean(m, "delete_subscriptions_on_shutdown", p,
                                                           d.delete_subscriptions_on_shutdown),
            delivery_guarantee=self.choice(m, "delivery_guarantee", p, d.delivery_guarantee,
                                           options=DELIVERY_GUARANTEES, normalize=str.lower),
            coordination=self.choice(m, "coordination", p, d.coordination, options=COORDINATION_MODES,
                                     normalize=str.lower),
            apply_specs_on_start=self.boolean(m, "apply_specs_on_start", p, d.apply_specs_on_start),
            session_timeout_seconds=self.number(m, "session_timeout_seconds", p, d.session_timeout_seconds, lo=1,
                                                hi=MAX_SECONDS),
            replay_buffer_seconds=self.number(m, "replay_buffer_seconds", p, d.replay_buffer_seconds, lo=0,
                                              exclusive_lo=True),
            replay_buffer_messages=self.integer(m, "replay_buffer_messages", p, d.replay_buffer_messages, lo=1),
            pubnub_client=self.choice(m, "pubnub_client", p, d.pubnub_client, options=PUBNUB_CLIENTS,
                                      normalize=str.lower),
        )

    def metrics(self, raw: Any) -> MetricsConfig:
        p = "metrics"
        m = self.mapping(raw, p, ("host", "port"))
        return MetricsConfig(host=self.string(m, "host", p, "0.0.0.0"),
                             port=self.integer(m, "port", p, 9095, lo=0, hi=65535))

    def webhook(self, raw: Any, metrics: MetricsConfig) -> WebhookConfig:
        p = "webhook"
        if raw is None:
            raise self.fail(p, "required with transport: webhook (at least public_url)")
        m = self.mapping(raw, p, ("public_url", "path", "host", "port", "max_body_bytes", "answer_timeout_seconds",
                                  "retry_after_seconds", "dedup_window_seconds", "max_queued_records", "threads"))
        public_url = self.string(m, "public_url", p, required=True).rstrip("/")
        url = urlparse(public_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise self.fail(f"{p}.public_url", f"expected an https URL such as https://ingest.example.com, "
                                               f"got {public_url!r}")
        if url.scheme == "http" and url.hostname not in _LOOPBACK_HOSTS:
            raise self.fail(f"{p}.public_url", "must be https: RingCentral delivers over TLS 1.2+ only (terminate "
                                               "TLS in front of the worker; plain http is for a local sandbox)")
        path = self.string(m, "path", p, "/ringcentral/webhook")
        if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", path):
            raise self.fail(f"{p}.path", f"expected an absolute URL path such as /ringcentral/webhook, got {path!r}")
        port = self.integer(m, "port", p, 8080, lo=0, hi=65535)
        if port != 0 and port == metrics.port:
            raise self.fail(f"{p}.port", f"must differ from metrics.port ({metrics.port})")
        return WebhookConfig(
            public_url=public_url, path=path, host=self.string(m, "host", p, "0.0.0.0"), port=port,
            max_body_bytes=self.integer(m, "max_body_bytes", p, 256 * 1024, lo=1024, hi=MAX_CONFIG_BYTES * 16),
            answer_timeout_seconds=self.number(m, "answer_timeout_seconds", p, 2.0, lo=0, exclusive_lo=True,
                                               hi=MAX_WEBHOOK_ANSWER_SECONDS),
            retry_after_seconds=self.integer(m, "retry_after_seconds", p, 5, lo=1, hi=3600),
            dedup_window_seconds=self.number(m, "dedup_window_seconds", p, 600.0, lo=0, hi=86400.0),
            max_queued_records=self.integer(m, "max_queued_records", p, 10_000, lo=1),
            threads=self.integer(m, "threads", p, 16, lo=1, hi=1024))

    def logging(self, raw: Any) -> LoggingConfig:
        p = "logging"
        m = self.mapping(raw, p, ("level",))
        return LoggingConfig(level=self.choice(m, "level", p, "INFO", options=LOG_LEVELS, normalize=str.upper))


# Properties whose files or PEM text librdkafka loads when a client is created with TLS on.
_KAFKA_TLS_MATERIAL = re.compile(r"ssl\.(.+\.location|.+\.pem|keystore\..+)")
_SILENT = logging.getLogger("ingest.config.librdkafka-check")  # the trial clients' logs go nowhere
_SILENT.addHandler(logging.NullHandler())
_SILENT.propagate = False


def _librdkafka_problem(props: Mapping[str, str]) -> str | None:
    """What librdkafka says of these properties, or None if it takes them.

    A producer built with them (librdkafka validates every property when a client is created; a
    consumer property is ignored with a warning) and destroyed at once, in under a millisecond.
    Without `bootstrap.servers` it connects nowhere; its log lines are queued for a poll that never
    comes. A literal NaN/inf is refused for a numeric property: librdkafka parses "nan" as a number
    and every range check passes it.
    """
    trial = {k: v for k, v in props.items() if k != "bootstrap.servers"}
    try:
        Producer({**trial, "logger": _SILENT})
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        text = error.str() if hasattr(error, "str") else str(error)
        return redact(" ".join(text.split()).removeprefix("Failed to create producer: "))
    except (TypeError, ValueError) as exc:  # confluent-kafka's own keys: error_cb, on_delivery, ...
        return redact(str(exc))
    for key, value in trial.items():
        if value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity") and not _is_kafka_secret(key) \
                and _librdkafka_problem({key: "not-a-number"}) is not None:
            return f"must be a finite number, got {value.strip()}"
    return None


def _shown(value: float) -> str:
    """A number for an error message: `{:g}` for floats; integers as digits, a long one by its length."""
    if isinstance(value, float):
        return f"{value:g}"
    digits = str(abs(value))
    return str(value) if len(digits) <= 20 else f"an integer of {len(digits)} digits"


def _join(path: str, key: str) -> str:
    return key if path == "<top>" else f"{path}.{key}"
