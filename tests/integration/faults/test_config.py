"""Bad configuration, property-based: random values of random types at random keys, missing keys,
unknown keys and environment overrides, applied to a valid config. `load_config` either accepts the
result or raises `ConfigError` whose message starts with the key at fault (never another exception,
never a secret); `ingest run --config BAD` exits 2 with that message and no traceback."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from ingest.config import ConfigError, load_config

CLIENT_SECRET = "cs-fuzz-secret-value-123"
JWT = "eyJhbGciOi.jwt-fuzz-payload.sig"
ENV = {"RC_SECRET": CLIENT_SECRET, "ACME_JWT": JWT}
SECTIONS = ("kafka", "topics", "ringcentral", "accounts", "worker", "metrics", "logging")

VALID: dict[str, Any] = {
    "kafka": {"bootstrap.servers": "127.0.0.1:9092", "linger.ms": 5},
    "topics": {"prefix": "rc", "partitions": 3, "replication_factor": 1, "routing": {"presence": "rc.p"}},
    "ringcentral": {"server": "https://platform.ringcentral.com", "client_id": "cid",
                    "client_secret_env": "RC_SECRET", "pubnub_origin": None, "pubnub_ssl": True},
    "accounts": [{"name": "acme", "jwt_env": "ACME_JWT", "subscriptions": [
        {"name": "messages", "event_filters": ["/restapi/v1.0/account/~/extension/~/message-store"]},
        {"name": "presence", "event_filters": ["/restapi/v1.0/account/~/presence"]}]}],
    "worker": {"id": "w-1", "renewal_margin_seconds": 120, "renewal_jitter_seconds": 15, "expires_in_seconds": 900,
               "channels_per_connection": 50, "checkpoint_interval_seconds": 1.0, "shutdown_timeout_seconds": 10,
               "delete_subscriptions_on_shutdown": False, "delivery_guarantee": "at-least-once"},
    "metrics": {"host": "0.0.0.0", "port": 9095},
    "logging": {"level": "INFO"},
}

Path_ = tuple[str | int, ...]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["", " ", "~", "null", "1e3", "yes", "/", "a/b", "0x10"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
key_names = st.from_regex(r"[a-z][a-z_.]{0,11}", fullmatch=True)


def paths(node: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every key path (dict keys and list indexes) in the tree."""
    out: list[Path_] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out.extend(paths(child, (*prefix, key)))
    return out


def dotted(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _parent(doc: Any, path: Path_) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """A valid config with 1-3 mutations; returns (doc, env, dotted paths touched)."""
    doc = copy.deepcopy(VALID)
    env = dict(ENV)
    touched: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "set", "delete", "unknown", "env"]))
        candidates = paths(doc)
        if kind == "env" or not candidates:
            section = draw(st.sampled_from(["worker", "topics", "metrics", "logging", "kafka", "ringcentral"]))
            key = draw(st.one_of(key_names, st.sampled_from(sorted(VALID.get(section) or {"x": 0}))))
            var = f"INGEST__{section.upper()}__{key.upper().replace('.', '_')}"
            env[var] = draw(st.one_of(st.text(max_size=10), st.sampled_from(["1", "-5", "true", "[a]", "{}", "",
                                                                            ".nan", ".inf", "-.inf", "nan", "inf",
                                                                            "1" * 5000, "[" * 3000 + "]" * 3000])))
            touched.append(section)
            continue
        path = draw(st.sampled_from(candidates))
        parent = _parent(doc, path)
        if kind == "set":
            parent[path[-1]] = draw(values)
        elif kind == "delete":
            del parent[path[-1]]
        else:
            target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
            if not isinstance(target, dict):
                continue
            name = draw(key_names)
            target[name] = draw(values)
            path = (*path[:-1], name) if target is parent else (*path, name)
        touched.append(dotted(path))
    return doc, env, touched


SCHEMA_LEAVES = {str(k) for k in ("jwt_file", "client_secret_file", "bootstrap.servers", "name", "event_filters",
                                   "subscriptions", "jwt_env", "client_id", "server")}


def _key_strings(doc: Any, prefix: str = "") -> set[str]:
    """Dotted key paths as the loader writes them (`a.b`, `accounts[0].name`, `kafka.linger.ms`)."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for key, child in doc.items():
            here = f"{prefix}.{key}" if prefix else str(key)
            out |= {here} | _key_strings(child, here)
    elif isinstance(doc, list):
        for i, child in enumerate(doc):
            here = f"{prefix}[{i}]"
            out |= {here} | _key_strings(child, here)
    return out


def _override_key(var: str) -> str:
    """The key path an `INGEST__SECTION__KEY` variable sets (kafka: one dotted librdkafka property)."""
    parts = var.lower().split("__")[1:]
    if parts[0] == "kafka":
        return "kafka." + ".".join(parts[1:]).replace("_", ".")
    return ".".join(parts)


def _check(message: str, config_path: Path, env: dict[str, str]) -> None:
    # The keys as the loader saw them: PyYAML does not round-trip every key ('\x85' loads as ' ').
    doc = yaml.safe_load(config_path.read_text())
    assert CLIENT_SECRET not in message and JWT not in message, message
    assert "Traceback" not in message
    if message.startswith(f"{config_path}: "):
        return  # about the file as a whole (not a mapping)
    # An override creates its key path, so the error may name any of its levels.
    overrides = {".".join(key.split(".")[:n]) for var in env if var.startswith("INGEST__")
                 for key in [_override_key(var)] for n in range(1, key.count(".") + 2)}
    present = _key_strings(doc) | _key_strings(VALID) | set(env) | set(SECTIONS) | overrides | {"<top>"}
    # A key of the document (or of the schema), or a missing schema key under one.
    candidates = present | {f"{p}.{leaf}" for p in present for leaf in SCHEMA_LEAVES}
    assert any(message.startswith(f"{c}: ") for c in candidates), f"the error does not name a key: {message!r}"


def _write(directory: Path, doc: dict[str, Any]) -> Path:
    path = directory / "worker.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_config_is_accepted_or_a_config_error_naming_a_key(
        case: tuple[dict[str, Any], dict[str, str], list[str]]) -> None:
    doc, env, _touched = case
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), doc)
        try:
            config = load_config(path, env)
            event("accepted")
        except ConfigError as exc:
            event("ConfigError")
            _check(str(exc), path, env)
        else:  # every accepted number is a finite one (a NaN renewal margin never renewed)
            numbers = [v for section in (config.worker, config.topics, config.metrics)
                       for v in vars(section).values() if isinstance(v, int | float) and not isinstance(v, bool)]
            assert all(math.isfinite(v) for v in numbers), config


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from([*SECTIONS, "extra"]), values, max_size=7))
@example({"metrics": {"\x85": None}})  # a key PyYAML does not round-trip (it loads as " ")
def test_random_documents_are_a_config_error_naming_a_key(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), doc)
        try:
            load_config(path, ENV)
        except ConfigError as exc:
            _check(str(exc), path, ENV)
        else:  # a config needs accounts with credentials: nothing random is one
            raise AssertionError(f"a random document was accepted as a config: {doc!r}")


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_ingest_run_with_a_bad_config_exits_2_without_a_traceback(
        case: tuple[dict[str, Any], dict[str, str], list[str]]) -> None:
    doc, env, _touched = case
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), doc)
        try:
            load_config(path, env)
            expected = None
        except ConfigError as exc:
            expected = str(exc)
        assume(expected is not None)  # a valid config would start a worker
        proc = subprocess.run([sys.executable, "-m", "ingest", "run", "--config", str(path)], env={
            **{k: v for k, v in __import__("os").environ.items() if not k.startswith("INGEST__")}, **env},
            capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert expected is not None and expected in proc.stderr
