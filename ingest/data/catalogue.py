"""The event catalogue: event filter path -> family, JSON Schema validator and topic suffix.

`schemas/catalogue.json` lists the families and an ordered list of routes (path patterns with
`{placeholders}` and optional required query parameters). Everything is loaded and compiled ONCE:
the JSON Schemas (Draft 2020-12) are registered by their `$id` so that family schemas can `$ref`
the envelope, and each family gets one compiled `jsonschema_rs` validator.

Routing sits on the hot path but the same few event paths repeat (one per subscribed filter), so
`route()` caches its answer per distinct event string in a bounded dict. A path seen for the first time
is tried only against the routes that can match it (same number of segments, same last segment), a
handful whatever the size of the catalogue.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs

import ingest

ROUTE_CACHE_SIZE = 4096  # distinct event paths remembered; they are bounded by subscriptions x filters
MAX_CACHED_EVENT_LEN = 1024  # longer (garbage) event strings are routed but not cached
ACCOUNT_PATH = re.compile(r"^/restapi/v1\.0/account/([0-9]+)(?:[/?]|$)")


class CatalogueError(ValueError):
    """The catalogue or one of its schemas is inconsistent (names the file and the problem)."""


@dataclass(frozen=True, slots=True)
class Family:
    """One event family. Families without their own schema carry the envelope's id and validator."""

    name: str
    schema_id: str
    validator: jsonschema_rs.Validator
    topic_suffix: str | None  # None: the default topic

    @property
    def has_schema(self) -> bool:
        return self.topic_suffix is not None


@dataclass(frozen=True, slots=True)
class Route:
    """What an event path resolves to: its family and the numeric account id in the path, if any."""

    family: Family
    account_id: str | None  # digits from /restapi/v1.0/account/<digits>/...; None for `~` or no account


@dataclass(frozen=True, slots=True)
class _Rule:
    path: re.Pattern[str]
    query: tuple[tuple[str, str], ...]  # (name, lower-case value) pairs that must all be present
    family: Family


def schemas_dir() -> Path:
    """The schema directory: `schemas/` in a repo checkout, `ingest/_schemas` in an installed wheel."""
    package = Path(ingest.__file__).resolve().parent
    for candidate in (package / "_schemas", package.parent / "schemas"):
        if (candidate / "catalogue.json").is_file():
            return candidate
    raise CatalogueError(f"no catalogue.json in {package / '_schemas'} or {package.parent / 'schemas'}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogueError(f"{path}: {exc}") from exc


def _compile_pattern(pattern: str, placeholders: Mapping[str, str]) -> re.Pattern[str]:
    parts = []
    for segment in pattern.strip("/").split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            name = segment[1:-1]
            if name not in placeholders:
                raise CatalogueError(f"route {pattern!r}: unknown placeholder {{{name}}}")
            parts.append(f"(?:{placeholders[name]})")
        else:
            parts.append(re.escape(segment))
    return re.compile("/" + "/".join(parts) + "/?")


def _shape(pattern: str) -> tuple[int, str | None]:
    """Segment count of a route pattern and its last segment (None when that is a placeholder)."""
    segments = pattern.strip("/").split("/")
    last = segments[-1]
    return len(segments), None if last.startswith("{") else last


def _path_shape(path: str) -> tuple[int, str]:
    """Segment count and last segment of an event path (a trailing slash ignored, as the patterns do)."""
    trimmed = path.rstrip("/")
    return trimmed.count("/"), trimmed.rpartition("/")[2]


def _parse_query(query: str) -> dict[str, str]:
    """Names -> lower-cased values; cheap and tolerant (no percent-decoding: filters do not need it)."""
    params: dict[str, str] = {}
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if name:
            params[name] = value.lower()
    return params


@functools.cache
def default_catalogue() -> Catalogue:
    """The packaged catalogue, loaded and compiled once per process."""
    return Catalogue()


class Catalogue:
    """Families, their compiled validators and the routing rules; load once, share everywhere."""

    def __init__(self, directory: Path | None = None) -> None:
        directory = directory or schemas_dir()
        spec = _read_json(directory / "catalogue.json")
        try:
            placeholders: Mapping[str, str] = spec["placeholders"]
            family_specs: Mapping[str, Mapping[str, str | None]] = spec["families"]
            default_name: str = spec["default_family"]
            route_specs: list[Mapping[str, Any]] = spec["routes"]
        except (KeyError, TypeError) as exc:
            raise CatalogueError(f"{directory / 'catalogue.json'}: missing or malformed key {exc}") from exc

        documents = {p.name: _read_json(p) for p in sorted(directory.glob("*.json")) if p.name != "catalogue.json"}
        if "envelope.json" not in documents:
            raise CatalogueError(f"{directory}: envelope.json is missing")
        # Every schema is a resource of one registry, so `$ref: envelope.json` resolves offline.
        registry = jsonschema_rs.Registry([(doc["$id"], doc) for doc in documents.values()])

        def compile_schema(file: str) -> tuple[str, jsonschema_rs.Validator]:
            if file not in documents:
                raise CatalogueError(f"{directory}: schema {file} named in catalogue.json does not exist")
            doc = documents[file]
            try:
                return doc["$id"], jsonschema_rs.Draft202012Validator(doc, registry=registry)
            except (jsonschema_rs.ValidationError, ValueError) as exc:
                raise CatalogueError(f"{directory / file}: {exc}") from exc

        envelope_id, envelope_validator = compile_schema("envelope.json")
        self.envelope = Family("envelope", envelope_id, envelope_validator, None)
        families: dict[str, Family] = {}
        for name, fam in family_specs.items():
            schema_file, suffix = fam.get("schema"), fam.get("topic")
            if schema_file is None:
                families[name] = Family(name, envelope_id, envelope_validator, None)
            else:
                schema_id, validator = compile_schema(schema_file)
                families[name] = Family(name, schema_id, validator, suffix or name)
        families.setdefault(default_name, Family(default_name, envelope_id, envelope_validator, None))
        self.families: Mapping[str, Family] = families
        self.default: Family = families[default_name]

        by_shape: dict[tuple[int, str | None], list[_Rule]] = {}
        order: dict[int, int] = {}  # id(rule) -> position in the catalogue
        for route in route_specs:
            if route["family"] not in families:
                raise CatalogueError(f"route {route['pattern']!r}: unknown family {route['family']!r}")
            query = tuple((k, str(v).lower()) for k, v in route.get("query", {}).items())
            rule = _Rule(_compile_pattern(route["pattern"], placeholders), query, families[route["family"]])
            order[id(rule)] = len(order)
            by_shape.setdefault(_shape(route["pattern"]), []).append(rule)
        # Candidates per (segments, last segment): the routes with that last segment and those ending in a
        # placeholder, in catalogue order, so that the first match is the one a scan of every route finds.
        open_ended = {n: rules for (n, last), rules in by_shape.items() if last is None}
        self._candidates: dict[tuple[int, str], tuple[_Rule, ...]] = {
            (n, last): tuple(sorted([*rules, *open_ended.get(n, [])], key=lambda r: order[id(r)]))
            for (n, last), rules in by_shape.items() if last is not None}
        self._open_ended: dict[int, tuple[_Rule, ...]] = {n: tuple(rules) for n, rules in open_ended.items()}
        self._cache: dict[str, Route] = {}

    def resolve(self, event: str) -> Family:
        """The family of an event path (the default family when no route matches)."""
        return self.route(event).family

    def route(self, event: str) -> Route:
        """Family and path account id for an event path; cached per distinct path string."""
        hit = self._cache.get(event)
        if hit is not None:
            return hit
        route = self._route_uncached(event)
        if len(event) <= MAX_CACHED_EVENT_LEN:
            if len(self._cache) >= ROUTE_CACHE_SIZE:
                self._cache.clear()  # crude but bounded; real traffic has far fewer distinct paths
            self._cache[event] = route
        return route

    def _route_uncached(self, event: str) -> Route:
        path, _, query = event.partition("?")
        match = ACCOUNT_PATH.match(event)
        account = match.group(1) if match else None
        params = _parse_query(query) if query else {}
        segments, last = _path_shape(path)
        candidates = self._candidates.get((segments, last)) or self._open_ended.get(segments, ())
        for rule in candidates:
            if rule.path.fullmatch(path) and all(params.get(k) == v for k, v in rule.query):
                return Route(rule.family, account)
        return Route(self.default, account)
