"""Subscription lifecycle: reconcile desired specs with RingCentral and keep them alive.

One scheduler thread holds a heap of (due time, spec) for *all* specs and hands due work to a small
pool of API threads; nothing sleeps per subscription, so thousands of specs cost one thread plus the
pool. Each spec has at most one task in flight. What a task does depends on the spec's state:

- attach: reuse before create. Try the subscription id we were handed (restored state), then a live
  subscription of the user whose normalised event filters match (listed once per account and cached
  briefly), renewing it to learn its current channel and key; create one only when none matches.
  Restarts therefore never leak subscriptions, and a new owner never creates a second one.
- renew: `POST /subscription/{id}/renew` (Light group) at expiry - margin - jitter. Any change of
  channel, subscribe key or encryption key is reported through `on_delivery`. 404 (or already past
  expiry) -> create anew, then delete the stale id (ignoring 404).
- failures: 429 -> silent until the penalty ends (the HTTP client refuses to send for that
  user/group meanwhile, so sibling specs of the account stay silent too); 5xx/timeouts -> exponential
  backoff with jitter; a subscription that lapsed meanwhile is re-created on the next attempt.
- a removed spec gets `on_delivery(spec, None)` at once and its subscription deleted.

WebHook (`webhook_address` set): a subscription is created with `deliveryMode {transportType: WebHook,
address, verificationToken}`, a token of its own from `secrets`, handed to the data plane in its
`Delivery` (the receiver checks every POST against it). A subscription whose token is not known (the
answer does not carry it, and this worker did not create it) cannot be verified: it is not reused
but replaced (and deleted). RingCentral marks an endpoint that kept failing `Blacklisted` for good:
found at a renewal or a verification, it is deleted and created again, and the replacement reports
the gap since `blacklistedData.blacklistedAt`.

Unmatched subscriptions of a user are left alone: with several workers they belong to other owners,
and an orphan that nobody renews expires by itself within 15 minutes.

Orphans of a group member (`record_intent` set): before each creation the worker records an intent (the
spec, since when) and waits until it is durable. A worker that died between a creation and the record
naming it leaves the intent in the spec's record; the next owner (`set_specs(intents=...)`) lists the
user's subscriptions and adopts the one created since the intent (its `creationTime`, before this owner
took the spec over) whose filters are the spec's and that no state record names, instead of renewing
the recorded one or creating another. All specs of an account have their records in one partition, so
the owner of the spec knows every id its account's records name. Two specs with identical filters
and intents may adopt each other's orphans: identical filters receive the same events, so nothing is
lost or read twice either way. None alive: `orphan_missing` (a gap). Once RingCentral has answered a
creation, `record_creation` makes a record naming it (channel, key) durable before its delivery is
announced, so an orphan that expires before the next owner looks is still read (PubNub keeps its buffer).
"""

from __future__ import annotations

import heapq
import itertools
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from ingest.config import WorkerConfig
from ingest.model import Delivery, SubscriptionSpec
from ingest.observability.logs import get_logger, register_secret
from ingest.observability.metrics import Metrics
from ingest.rc.accounts import AccountSession
from ingest.rc.errors import ApiError, NetworkError, RateLimited, TokenUnavailable, missing_permission

log = get_logger(__name__)

STATES = ("pending", "active", "renewing", "retrying", "rate-limited", "failed", "deleted")
INVENTORY_MAX_AGE = 10.0  # seconds a user's subscription list is reused for matching
VERIFY_MIN_INTERVAL = 5.0  # report_problem() verifies a spec at most this often
MAX_BACKOFF = 30.0  # transient failures (5xx, timeouts)
MAX_FAILED_BACKOFF = 300.0  # permanent-looking failures (403 limit, 400 filters) are retried slowly
MIN_LIFETIME_FRACTION = 0.5  # a margin longer than the granted lifetime: renew half-way instead
PER_USER_LIMIT = 30  # subscriptions per user per app in the current spec (20 before 2025); warn beyond
BLACKLISTED = "Blacklisted"
# How long a creation waits for the deliveries of the spec's previous task to be announced (a callback stuck
# longer does not hold creations up for good).
ANNOUNCE_PATIENCE = 10.0
# How far the clocks of an intent's writer, RingCentral (`creationTime`) and PubNub (timetokens) may differ.
CLOCK_SKEW_SECONDS = 5.0
VERIFICATION_TOKEN_BYTES = 32  # WebHook tokens: secrets.token_urlsafe(32), 43 characters


class IntentNotRecorded(Exception):
    """The intent before a creation could not be made durable (Kafka down or slow): create later."""


@dataclass(frozen=True)
class SpecStatus:
    spec_id: str
    account: str
    state: str
    subscription_id: str | None
    expires_at: float | None
    renewals: int
    last_error: str | None


@dataclass
class _Entry:
    spec: SubscriptionSpec
    session: AccountSession | None
    state: str = "pending"
    action: str = "attach"  # attach | renew | verify | delete
    subscription_id: str | None = None
    candidate_id: str | None = None  # known id to try first (restored state / cancelled removal)
    # A restored intent: a subscription created since then by the previous owner may be named by no record;
    # look for it among those created before `orphan_until` (when this worker took the spec over).
    orphan_since: float | None = None
    orphan_until: float = 0.0
    create_reason: str = "new"
    expires_at: float | None = None
    confirmed_at: float | None = None  # when RingCentral last answered for the current subscription
    gone_since: float | None = None  # it was found gone (404) before its expiry: alive until at least here
    gone_reason: str = "gone"  # the Delivery.lapse_reason of a replacement for a subscription found gone
    # WebHook: (subscription id, verification token) of the subscription this entry created. A secret.
    webhook_token: tuple[str, str] | None = field(default=None, repr=False)
    announcing: bool = False  # the deliveries of its last task are being handed to the data plane
    delivery: Delivery | None = None
    renewals: int = 0
    failures: int = 0
    last_error: str | None = None
    last_verify: float = 0.0
    stale_ids: list[str] = field(default_factory=list)
    gen: int = 0
    busy: bool = False
    removed: bool = False
    pending_change: bool = False
    delete_on_remove: bool = True
    callback_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Inventory:
    fetched_at: float = -1e18
    records: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SubscriptionManager:
    """Keeps one live RingCentral subscription per spec; see the module docstring."""

    def __init__(self, *, accounts: Mapping[str, AccountSession], metrics: Metrics,
                 on_delivery: Callable[[str, Delivery | None], None],
                 renewal_margin: float = WorkerConfig.renewal_margin_seconds,
                 renewal_jitter: float = WorkerConfig.renewal_jitter_seconds,
                 expires_in: int = WorkerConfig.expires_in_seconds,
                 clock: Callable[[], float] = time.time, api_threads: int = 8,
                 adopt_matching: bool = True, webhook_address: str | None = None) -> None:
        self.accounts = dict(accounts)
        self.metrics = metrics
        self.on_delivery = on_delivery
        self.renewal_margin = renewal_margin
        self.renewal_jitter = renewal_jitter
        self.expires_in = expires_in
        # The shortest lifetime RingCentral has granted (it may grant less than asked): a subscription created
        # less than this long ago is still alive unless deleted, which tells an intent that created nothing.
        # One reused or adopted shows only what it has left: lower, which errs towards reporting a gap.
        self._shortest_lifetime = float(expires_in)
        self.clock = clock
        self._api_threads = api_threads
        # Adopting a live subscription whose filters match is right for a worker that owns all of a
        # user's specs; in a group, another worker's spec may hold it, so only recorded ids are reused.
        self.adopt_matching = adopt_matching
        # Group mode: records the intent before each creation, returning once it is durable (raises
        # IntentNotRecorded otherwise). Set by the ownership before the first specs.
        # The second argument says whether the creation was abandoned meanwhile (the spec removed or released).
        self.record_intent: Callable[[str, Callable[[], bool]], None] | None = None
        # Group mode: records a PubNub subscription just created, channel and key, returning once that record
        # is durable (IntentNotRecorded otherwise), before its delivery is announced and its channel read.
        self.record_creation: Callable[[Delivery, Callable[[], bool]], None] | None = None
        # Group mode: a restored intent found no subscription alive to adopt: (spec id, the intent's time).
        self.orphan_missing: Callable[[str, float], None] | None = None
        self._named: frozenset[str] = frozenset()  # subscription ids the restored state records name
        self.webhook_address = webhook_address  # None: PubNub delivery
        self._cond = threading.Condition(threading.RLock())
        self._entries: dict[str, _Entry] = {}
        self._removing: dict[str, _Entry] = {}
        self._finished: dict[str, SpecStatus] = {}  # removed specs, for snapshot() (bounded)
        self._claimed: set[str] = set()  # subscription ids held or about to be tried by some spec
        self._inventories: dict[str, _Inventory] = {name: _Inventory() for name in self.accounts}
        self._state_counts: dict[str, int] = dict.fromkeys(STATES, 0)  # over self._entries
        self._heap: list[tuple[float, int, str, int]] = []  # (due time, seq, spec id, gen)
        self._ready: list[tuple[float, int, str, int]] = []  # due tasks: (deadline, seq, spec id, gen)
        self._in_flight = 0  # tasks handed to the pool (never more than api_threads)
        self._seq = itertools.count()
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._random = random.Random()

    # ---- public API ------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._pool = ThreadPoolExecutor(max_workers=self._api_threads, thread_name_prefix="rc-api")
            self._thread = threading.Thread(target=self._schedule_loop, name="rc-scheduler", daemon=True)
            self._thread.start()

    def set_specs(self, specs: Iterable[SubscriptionSpec], known_ids: Mapping[str, str] | None = None,
                  intents: Mapping[str, float] | None = None, named_ids: Collection[str] = ()) -> None:
        """Make `specs` the desired state: add new ones, update changed ones, remove the rest.

        `known_ids` maps spec id -> a subscription id believed to belong to it (restored state); it is
        renewed before anything else is tried, so a new owner continues the existing subscription.
        `intents` maps spec id -> a restored intent's time: an added spec first looks for an orphan
        created since then (see the module docstring); `named_ids`: every subscription id the restored
        records name (none of them is an orphan).
        """
        desired = {s.spec_id: s for s in specs}
        known = dict(known_ids or {})
        pending_intents = dict(intents or {})
        per_account = Counter(s.account for s in desired.values())
        for account, count in per_account.items():
            if count > PER_USER_LIMIT:
                # RingCentral allows 20 (30 since 2025) subscriptions per user and app: the rest will
                # fail with 403 SUB-505. Several specs can often be merged into one (filters are a list).
                log.warning("subscription.per_user_limit", account=account, specs=count, limit=PER_USER_LIMIT)
        removed: list[_Entry] = []
        with self._cond:
            self._named = frozenset(named_ids)
            for spec_id, entry in list(self._entries.items()):
                if spec_id not in desired:
                    removed.append(self._remove_locked(entry))
            for spec_id, spec in desired.items():
                current = self._entries.get(spec_id)
                if current is None:
                    self._add_locked(spec, known.get(spec_id), pending_intents.get(spec_id))
                elif current.spec.event_filters != spec.event_filters or current.spec.account != spec.account:
                    self._change_locked(current, spec)
            self._publish_states_locked()
        for entry in removed:
            self._announce_removal(entry)

    def halt(self) -> None:
        """Schedule no more calls, at once and without waiting for those in flight (`stop` does the
        rest). For a worker that was fenced: a newer instance serves its specs, and a subscription it
        created now would be named by no state record and read by no one."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def stop(self, delete_subscriptions: bool = False) -> None:
        """Stop scheduling, finish in-flight calls, optionally delete every subscription, end sessions."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, pool = self._thread, self._pool
            self._thread = self._pool = None
        if thread is not None:
            thread.join()
        if pool is not None:
            pool.shutdown(wait=True)
        with self._cond:
            removing = list(self._removing.values())
            entries = list(self._entries.values())
        # Removed specs' subscriptions are deleted in any case (no one wants them), except those handed
        # over to another worker (`release`), whose removal may still be queued; the owned ones only on
        # request: by default they stay alive for the next start, which reuses them.
        doomed = [e for e in removing if e.delete_on_remove] + (entries if delete_subscriptions else [])
        with ThreadPoolExecutor(max_workers=self._api_threads, thread_name_prefix="rc-delete") as deleter:
            for entry in doomed:
                if entry.session is not None:
                    for sub_id in [*entry.stale_ids, *([entry.subscription_id] if entry.subscription_id else [])]:
                        deleter.submit(self._delete_id, entry.session, sub_id)
        for session in self.accounts.values():
            session.close()
        log.info("subscriptions.stopped", specs=len(entries), deleted=delete_subscriptions)

    def snapshot(self) -> list[SpecStatus]:
        with self._cond:
            live = [self._status(e) for e in self._entries.values()]
            live += [self._status(e) for e in self._removing.values()]
            return sorted(live + list(self._finished.values()), key=lambda s: s.spec_id)

    def release(self, spec_ids: Collection[str], timeout: float = 15.0) -> dict[str, str | None]:
        """Hand specs over to another worker: stop renewing them, but keep their subscriptions alive.

        Unlike removal (set_specs without them), nothing is deleted and no `on_delivery(None)` is
        announced: the caller drops its own state, and the new owner renews the same subscriptions.
        Waits (up to `timeout`) for API calls in flight for these specs, so that a subscription being
        created right now is not orphaned; returns spec id -> its subscription id, to record for the
        new owner.
        """
        with self._cond:
            entries = []
            for spec_id in spec_ids:
                entry = self._entries.get(spec_id)
                if entry is not None:
                    entry.delete_on_remove = False
                    self._remove_locked(entry)
                    entries.append(entry)
            self._publish_states_locked()
            deadline = time.monotonic() + timeout
            while any(e.busy for e in entries) and time.monotonic() < deadline:
                self._cond.wait(0.1)
            handed = {e.spec.spec_id: e.subscription_id or e.candidate_id for e in entries}
        log.info("subscriptions.released", specs=len(handed))
        return handed

    def report_problem(self, spec_id: str, reason: str) -> None:
        """The data plane suspects the spec's subscription (e.g. PubNub 403): verify it soon."""
        with self._cond:
            entry = self._entries.get(spec_id)
            now = self.clock()
            if entry is None or entry.subscription_id is None or entry.state != "active" or entry.busy:
                return
            if now - entry.last_verify < VERIFY_MIN_INTERVAL:
                return
            entry.last_verify = now
            entry.action = "verify"
            self._schedule_locked(entry, now)
        log.info("subscription.problem_reported", spec=spec_id, reason=reason)

    # ---- desired-state bookkeeping (lock held) ---------------------------------------------------

    def _add_locked(self, spec: SubscriptionSpec, known_id: str | None, intent: float | None = None) -> None:
        old = self._removing.pop(spec.spec_id, None)
        self._finished.pop(spec.spec_id, None)
        entry = _Entry(spec=spec, session=self.accounts.get(spec.account))
        if old is not None and not old.busy and old.spec.event_filters == spec.event_filters \
                and old.subscription_id:
            # Re-added before its deletion ran: keep the subscription instead of deleting it.
            old.removed = False
            entry = old
            entry.candidate_id, entry.subscription_id = old.subscription_id, None
            entry.delivery = None  # `None` was announced: the next activation must report again
            entry.state, entry.action = "pending", "attach"
        elif known_id:
            entry.candidate_id = known_id
        if intent is not None:
            entry.orphan_since, entry.orphan_until = intent, self.clock()
        if entry.candidate_id:
            self._claimed.add(entry.candidate_id)
        if entry.session is None:
            entry.state, entry.last_error = "failed", f"unknown account {spec.account!r}"
            log.error("subscription.unknown_account", spec=spec.spec_id, account=spec.account)
        self._entries[spec.spec_id] = entry
        self._state_counts[entry.state] += 1
        if entry.session is None:
            return
        if not entry.busy:
            self._schedule_locked(entry, self.clock())

    def _change_locked(self, entry: _Entry, spec: SubscriptionSpec) -> None:
        """Event filters changed: a new subscription replaces the old one (deleted after the switch)."""
        entry.spec = spec
        if entry.busy:
            entry.pending_change = True  # applied when the running task has finished
            return
        self._apply_change_locked(entry)

    def _apply_change_locked(self, entry: _Entry) -> None:
        session = self.accounts.get(entry.spec.account)
        if entry.subscription_id:
            if entry.session is session:
                entry.stale_ids.append(entry.subscription_id)
            self._claimed.discard(entry.subscription_id)
            entry.subscription_id = None
        if entry.session is not session:
            entry.session = session
            entry.stale_ids.clear()  # they belong to another user; they lapse by themselves
        if entry.candidate_id:
            self._claimed.discard(entry.candidate_id)
        entry.candidate_id = None
        entry.create_reason = "spec-changed"
        entry.action = "attach"
        self._to_state_locked(entry, "pending")
        if not entry.busy and entry.session is not None:
            self._schedule_locked(entry, self.clock())

    def _remove_locked(self, entry: _Entry) -> _Entry:
        del self._entries[entry.spec.spec_id]
        self._state_counts[entry.state] -= 1
        entry.removed = True
        entry.action = "delete"
        entry.gen += 1  # cancels its pending renewal
        self._removing[entry.spec.spec_id] = entry
        self.metrics.subscription_expiry.remove(entry.spec.spec_id)
        if not entry.busy:
            self._schedule_locked(entry, self.clock())
        return entry

    def _announce_removal(self, entry: _Entry) -> None:
        with entry.callback_lock:  # orders this after any delivery callback already running
            self._callback(entry.spec.spec_id, None)
        log.info("subscription.spec_removed", spec=entry.spec.spec_id, subscription_id=entry.subscription_id)

    def _schedule_locked(self, entry: _Entry, due: float) -> None:
        entry.gen += 1
        heapq.heappush(self._heap, (due, next(self._seq), entry.spec.spec_id, entry.gen))
        self._cond.notify()

    def _publish_states_locked(self) -> None:
        self.metrics.set_subscription_states(self._state_counts)

    def _to_state_locked(self, entry: _Entry, state: str) -> None:
        """Change an entry's state, keeping the per-state counts (owned specs only) in step: O(1)."""
        if self._entries.get(entry.spec.spec_id) is entry:
            self._state_counts[entry.state] -= 1
            self._state_counts[state] += 1
        entry.state = state
        self._publish_states_locked()

    def _set_state(self, entry: _Entry, state: str) -> None:
        with self._cond:
            self._to_state_locked(entry, state)

    # ---- scheduler -------------------------------------------------------------------------------

    def _schedule_loop(self) -> None:
        with self._cond:
            while not self._stopping:
                now = self.clock()
                # Due tasks queue here by deadline, and only as many run as there are API threads: a
                # backlog of creations (thousands of specs starting at once) must not delay a renewal
                # whose subscription is about to expire. Renewals go first, nearest expiry first.
                while self._heap and self._heap[0][0] <= now:
                    _, _, spec_id, gen = heapq.heappop(self._heap)
                    entry = self._entries.get(spec_id) or self._removing.get(spec_id)
                    if entry is None or entry.gen != gen or entry.busy:
                        continue
                    heapq.heappush(self._ready, (self._deadline(entry), next(self._seq), spec_id, gen))
                while self._ready and self._in_flight < self._api_threads:
                    _, _, spec_id, gen = heapq.heappop(self._ready)
                    entry = self._entries.get(spec_id) or self._removing.get(spec_id)
                    if entry is None or entry.gen != gen or entry.busy:
                        continue
                    entry.busy = True
                    self._in_flight += 1
                    assert self._pool is not None
                    self._pool.submit(self._run, entry)
                wait = self._heap[0][0] - now if self._heap else 1.0
                self._cond.wait(min(max(wait, 0.0), 1.0))  # a finished task notifies too

    @staticmethod
    def _deadline(entry: _Entry) -> float:
        """When a due task must have run: a renewal (or verification) by its subscription's expiry;
        anything else (attach, delete) has no deadline and yields to those."""
        if entry.action in ("renew", "verify") and not entry.removed and entry.expires_at is not None:
            return entry.expires_at
        return float("inf")

    def _run(self, entry: _Entry) -> None:
        deliveries: list[Delivery] = []
        was_removed = entry.removed
        try:
            if entry.removed:
                self._delete_entry(entry)
            elif entry.action == "renew":
                self._renew(entry, deliveries)
            elif entry.action == "verify":
                self._verify(entry, deliveries)
            else:
                self._attach(entry, deliveries)
        except Exception as exc:  # every failure becomes a state and a retry, never a dead thread
            self._failed(entry, exc)
        finally:
            with self._cond:
                entry.busy = False
                entry.announcing = bool(deliveries)
                self._in_flight -= 1
                self._cond.notify_all()  # the scheduler (a free API thread) and release() may wait for this
                if entry.removed and not was_removed and not self._stopping:
                    entry.action = "delete"  # removed while this task ran: delete what it ended with
                    self._schedule_locked(entry, self.clock())
                elif entry.pending_change and not entry.removed:
                    entry.pending_change = False
                    self._apply_change_locked(entry)
            with entry.callback_lock:
                if not entry.removed:
                    for delivery in deliveries:
                        self._callback(entry.spec.spec_id, delivery)
            if deliveries:
                with self._cond:
                    entry.announcing = False
                    self._cond.notify_all()

    def _callback(self, spec_id: str, delivery: Delivery | None) -> None:
        try:
            self.on_delivery(spec_id, delivery)
        except Exception:  # a data-plane bug must not stop renewals
            log.error("subscription.on_delivery_failed", exc_info=True, spec=spec_id)

    # ---- actions (API threads) -------------------------------------------------------------------

    def _attach(self, entry: _Entry, deliveries: list[Delivery]) -> None:
        session = entry.session
        assert session is not None
        account_id, extension_id = session.resolve()
        wanted = normalize_filters(entry.spec.event_filters, account_id, extension_id)
        if entry.orphan_since is not None:
            adopted = self._adopt_orphan(entry, deliveries, wanted, account_id, extension_id)
            entry.orphan_since = None  # looked for (a failed look raised before this: looked for again)
            if adopted:
                return
        candidate = entry.candidate_id
        if candidate:
            info = self._renew_existing(entry, candidate)  # on a transient error the candidate stays
            entry.candidate_id = None
            if info is not None:
                if normalize_filters(info.get("eventFilters") or [], account_id, extension_id) == wanted \
                        and self._reusable(entry, info):
                    self._activate(entry, info, deliveries, how="reused-known")
                    return
                entry.stale_ids.append(candidate)  # ours, but for other filters (or its token is unknown)
            with self._cond:
                self._claimed.discard(candidate)
        for record in self._inventory(session) if self.adopt_matching else []:
            sub_id = str(record.get("id") or "")
            if not sub_id or record.get("status", "Active") != "Active":
                continue
            if normalize_filters(record.get("eventFilters") or [], account_id, extension_id) != wanted \
                    or not self._reusable(entry, record):
                continue
            with self._cond:
                if sub_id in self._claimed:
                    continue
                self._claimed.add(sub_id)
                entry.candidate_id = sub_id  # if the renewal fails transiently, try this one first next time
            info = self._renew_existing(entry, sub_id)
            entry.candidate_id = None
            if info is not None:
                self._activate(entry, info, deliveries, how="reused")
                return
            with self._cond:
                self._claimed.discard(sub_id)
        self._create(entry, deliveries)

    def _adopt_orphan(self, entry: _Entry, deliveries: list[Delivery], wanted: tuple[str, ...], account_id: str,
                      extension_id: str) -> bool:
        """Adopt the subscription the previous owner created since its intent and died before recording:
        live, the spec's filters, created within (intent, takeover), claimed by no spec and named by no
        record. Its renewal gives its channel and key; the data plane reads the channel from the
        intent's time (`SpecChannels._resume`), so nothing it received is lost. The recorded one (being
        replaced when the previous owner died) is deleted. False when there is none: unless another spec
        with the same filters reads one, that is a gap (`orphan_missing`): a subscription created then
        and ended since is named by no record (the creation's own record was not durable)."""
        session = entry.session
        assert session is not None and entry.orphan_since is not None
        since, until = entry.orphan_since - CLOCK_SKEW_SECONDS, entry.orphan_until
        found = []
        for record in self._inventory(session, listed_after=until):
            sub_id, created = str(record.get("id") or ""), _parse_time(record.get("creationTime"))
            if not sub_id or created is None or not since <= created <= until or sub_id in self._named \
                    or record.get("status", "Active") != "Active" or not self._reusable(entry, record) \
                    or normalize_filters(record.get("eventFilters") or [], account_id, extension_id) != wanted:
                continue
            found.append((created, sub_id))
        intent = entry.orphan_since
        read_elsewhere = False
        for created, sub_id in sorted(found):
            info: dict[str, Any] | None = None
            with self._cond:
                if sub_id in self._claimed:
                    read_elsewhere = True
                    continue  # another spec (with the same filters) has it
                self._claimed.add(sub_id)
                entry.orphan_since = None  # no longer waiting for one (`_awaiting_orphans`)
            try:
                info = self._renew_existing(entry, sub_id)
            finally:
                if info is None:  # gone, or a transient failure (raised: the next attempt looks again)
                    with self._cond:
                        self._claimed.discard(sub_id)
                        entry.orphan_since = intent
            if info is None:
                continue
            log.warning("subscription.orphan_adopted", spec=entry.spec.spec_id, subscription_id=sub_id,
                        created_at=created, intent_since=intent, recorded=entry.candidate_id)
            with self._cond:
                if entry.candidate_id and entry.candidate_id != sub_id:
                    entry.stale_ids.append(entry.candidate_id)  # replaced by the orphan: deleted once active
                    self._claimed.discard(entry.candidate_id)
                entry.candidate_id = None
                if not self._awaiting_orphans(entry, wanted, account_id, extension_id):
                    # Later ones with the same filters (a creation retried after its answer was lost):
                    # all they received, the adopted one received too. Deleted once it is active.
                    extra = [i for c, i in found if c >= created and i != sub_id and i not in self._claimed]
                    entry.stale_ids.extend(extra)
                    if extra:
                        log.warning("subscription.orphans_deleted", spec=entry.spec.spec_id, subscription_ids=extra)
            self._activate(entry, info, deliveries, how="adopted")
            return True
        if self.clock() - intent < self._shortest_lifetime - CLOCK_SKEW_SECONDS:
            # Anything created since the intent would still be alive: the creation never reached RingCentral
            # (the previous owner lost the spec first). Reporting a gap here was a false alarm (make test).
            log.info("subscription.intent_created_nothing", spec=entry.spec.spec_id, intent_since=intent)
        elif self.orphan_missing is not None and not read_elsewhere:
            # If the previous owner created one, it has ended unread and no record names its channel.
            self.orphan_missing(entry.spec.spec_id, intent)
        return False

    def _awaiting_orphans(self, entry: _Entry, wanted: tuple[str, ...], account_id: str, extension_id: str) -> bool:
        """Whether another spec of the entry's account with the same filters has yet to claim an
        orphan (lock held)."""
        return any(other is not entry and other.session is entry.session and other.orphan_since is not None
                   and normalize_filters(other.spec.event_filters, account_id, extension_id) == wanted
                   for other in self._entries.values())

    def _renew_existing(self, entry: _Entry, sub_id: str) -> dict[str, Any] | None:
        """Renew a subscription we want to adopt; None if it is gone (404)."""
        session = entry.session
        assert session is not None
        try:
            return session.client.renew_subscription(sub_id)
        except ApiError as exc:
            if exc.status == 404:
                log.info("subscription.reuse_gone", spec=entry.spec.spec_id, subscription_id=sub_id)
                self._forget_inventory(session.name, sub_id)
                return None
            raise

    def _reusable(self, entry: _Entry, info: dict[str, Any]) -> bool:
        """PubNub: always. WebHook: only one delivering to our address whose token we know."""
        if self.webhook_address is None:
            return True
        mode = info.get("deliveryMode") or {}
        return mode.get("address") == self.webhook_address and self._webhook_token(entry, info) is not None

    @staticmethod
    def _webhook_token(entry: _Entry, info: dict[str, Any]) -> str | None:
        """The verification token of a WebHook subscription: as RingCentral returns it, else ours."""
        mode = info.get("deliveryMode") or {}
        token = mode.get("verificationToken") or mode.get("validationToken")
        if token:
            return str(token)
        if entry.webhook_token is not None and entry.webhook_token[0] == str(info.get("id") or ""):
            return entry.webhook_token[1]
        return None

    def _create(self, entry: _Entry, deliveries: list[Delivery]) -> None:
        session = entry.session
        assert session is not None
        reason = entry.create_reason
        started = self.clock()
        filters, token = list(entry.spec.event_filters), None
        if self.webhook_address is not None:
            token = secrets.token_urlsafe(VERIFICATION_TOKEN_BYTES)
            register_secret(token)
        intent: dict[str, float] = {}
        if self.record_intent is not None:
            with self._cond:  # the announcement of the previous creation ends its intent: not this one's
                deadline = time.monotonic() + ANNOUNCE_PATIENCE
                while entry.announcing and time.monotonic() < deadline:
                    self._cond.wait(0.1)
            # Durable before the POST (see the module docstring); a spec released meanwhile is not created.
            self.record_intent(entry.spec.spec_id, lambda: entry.removed or self._stopping)
            intent["intent_seconds"] = round(self.clock() - started, 3)  # what the intent costs a creation
        try:
            if token is not None and self.webhook_address is not None:
                info = session.client.create_webhook_subscription(filters, self.expires_in, self.webhook_address,
                                                                  token)
            else:
                info = session.client.create_subscription(filters, self.expires_in)
        except Exception as exc:
            if not (isinstance(exc, RateLimited) and not exc.sent):  # refused locally: not an attempt
                self.metrics.creation_failures.labels(reason).inc()
            raise exc from None
        if token is not None:
            entry.webhook_token = (str(info.get("id") or ""), token)
        self.metrics.creations.labels(reason).inc()
        self._activate(entry, info, deliveries, how="created", started=started, **intent)
        self._record_creation(entry)

    def _record_creation(self, entry: _Entry) -> None:
        """Make the record naming a PubNub subscription just created durable before its channel is read (a
        WebHook or WebSocket delivery has no buffer to read again). Not durable in time, it is read all
        the same: the intent, durable, makes the next owner look for it."""
        delivery = entry.delivery
        if self.record_creation is None or delivery is None or delivery.transport != "PubNub":
            return
        try:
            self.record_creation(delivery, lambda: entry.removed or self._stopping)
        except IntentNotRecorded as exc:
            log.warning("subscription.creation_unrecorded", spec=entry.spec.spec_id,
                        subscription_id=delivery.subscription_id, error=str(exc))

    def _renew(self, entry: _Entry, deliveries: list[Delivery]) -> None:
        session = entry.session
        assert session is not None and entry.subscription_id is not None
        started = self.clock()
        previous_expiry = entry.expires_at or started
        if started >= previous_expiry:
            # Lapsed (penalty, outage): RingCentral has dropped it or will answer 404; start over.
            log.warning("subscription.lapsed", spec=entry.spec.spec_id, subscription_id=entry.subscription_id,
                        late_by=round(started - previous_expiry, 3))
            self._drop_subscription(entry, "expired")
            self._create(entry, deliveries)
            return
        self._set_state(entry, "renewing")
        try:
            info = session.client.renew_subscription(entry.subscription_id)
        except ApiError as exc:
            if exc.status != 404:
                raise
            self.metrics.renewals.labels("not-found").inc()
            log.warning("subscription.renew_not_found", spec=entry.spec.spec_id,
                        subscription_id=entry.subscription_id, error_code=exc.error_code)
            self._drop_subscription(entry, "not-found")
            self._create(entry, deliveries)
            return
        if info.get("status") == BLACKLISTED:
            self._replace_blacklisted(entry, info, deliveries)
            return
        changed = self._activate(entry, info, deliveries, how="renewed", started=started)
        entry.renewals += 1
        self.metrics.renewals.labels("changed" if changed else "ok").inc()
        self.metrics.renewal_margin.observe(max(0.0, previous_expiry - self.clock()))

    def _verify(self, entry: _Entry, deliveries: list[Delivery]) -> None:
        session = entry.session
        assert session is not None and entry.subscription_id is not None
        started = self.clock()
        try:
            info = session.client.get_subscription(entry.subscription_id)
        except ApiError as exc:
            if exc.status != 404:
                raise
            info = None
        expired = info is not None and _expires_at(info, started) <= self.clock()
        if info is not None and info.get("status") == BLACKLISTED:
            self._replace_blacklisted(entry, info, deliveries)
            return
        if info is None or info.get("status", "Active") != "Active" or expired:
            log.warning("subscription.verify_failed", spec=entry.spec.spec_id, subscription_id=entry.subscription_id)
            self._drop_subscription(entry, "not-found" if info is None else "expired")
            self._create(entry, deliveries)
            return
        self._activate(entry, info, deliveries, how="verified", started=started)

    def _replace_blacklisted(self, entry: _Entry, info: dict[str, Any], deliveries: list[Delivery]) -> None:
        """RingCentral stopped delivering to us for good: delete it, create another, report the gap."""
        data = info.get("blacklistedData") or {}
        since = _parse_time(data.get("blacklistedAt")) or entry.confirmed_at
        log.warning("subscription.blacklisted", spec=entry.spec.spec_id, subscription_id=entry.subscription_id,
                    reason=str(data.get("reason") or ""), blacklisted_at=data.get("blacklistedAt"))
        self._drop_subscription(entry, "blacklisted")
        with self._cond:
            entry.gone_since, entry.gone_reason = since, "blacklisted"
        self._create(entry, deliveries)

    def _drop_subscription(self, entry: _Entry, reason: str) -> None:
        with self._cond:
            if reason == "not-found" or (reason == "expired" and (entry.expires_at or 0) > self.clock()):
                # Deleted or expired server-side before its time: nothing says since when, only that it
                # was alive when RingCentral last answered for it. A replacement reports that window.
                entry.gone_since = entry.confirmed_at
            if entry.subscription_id:
                entry.stale_ids.append(entry.subscription_id)
                self._claimed.discard(entry.subscription_id)
            entry.subscription_id = None
            entry.create_reason = reason
            # If the creation that follows fails, the retry must create again, not renew nothing.
            entry.action = "attach"

    def _activate(self, entry: _Entry, info: dict[str, Any], deliveries: list[Delivery], *, how: str,
                  started: float | None = None, **logged: object) -> bool:
        """Adopt a SubscriptionInfo; returns whether channel, subscribe key or encryption key changed.
        `logged`: more fields for its log line."""
        session = entry.session
        assert session is not None
        now = self.clock()
        mode = info.get("deliveryMode") or {}
        sub_id, channel, sub_key, verification_token = self._where(entry, info)
        key = mode.get("encryptionKey") if mode.get("encryption") in (True, "true") else None
        previous = entry.delivery
        if key is None and mode.get("encryption") in (True, "true") and previous is not None and \
                previous.subscription_id == sub_id:
            key = previous.encryption_key  # GET may omit the key; it does not change without a renewal
        if key:
            register_secret(str(key))
        expires_at = _expires_at(info, now if started is None else started)
        account_id = session.account_id or ""
        # A creation after the previous subscription's expiry: the window between them is a lapse. One
        # that replaces a subscription found gone before its expiry: the window since it was last
        # confirmed alive may be one (RingCentral does not say when it deleted or expired it).
        replacing = how in ("created", "reused")
        lapsed = replacing and entry.expires_at is not None and entry.expires_at <= (started or now)
        gone = replacing and not lapsed and entry.gone_since is not None
        delivery = Delivery(spec_id=entry.spec.spec_id, account_id=account_id, subscription_id=sub_id,
                            subscriber_key=str(sub_key), channel=str(channel),
                            encryption_key=str(key) if key else None, expires_at=expires_at,
                            lapsed_since=entry.expires_at if lapsed else entry.gone_since if gone else None,
                            lapse_reason="expired" if lapsed else entry.gone_reason if gone else None,
                            transport=str(mode.get("transportType") or "PubNub"),
                            verification_token=verification_token)
        changed = previous is None or (previous.subscription_id, previous.subscriber_key, previous.channel,
                                       previous.encryption_key) != (sub_id, delivery.subscriber_key,
                                                                    delivery.channel, delivery.encryption_key)
        due = self._renewal_due(expires_at, now)
        with self._cond:
            entry.subscription_id = sub_id
            self._claimed.add(sub_id)
            entry.expires_at = expires_at
            entry.confirmed_at = now
            self._shortest_lifetime = min(self._shortest_lifetime, expires_at - now)
            entry.gone_since, entry.gone_reason = None, "gone"
            entry.delivery = delivery
            entry.failures = 0
            entry.last_error = None
            self._to_state_locked(entry, "active")
            entry.create_reason = "not-found"
            if not entry.removed:
                entry.action = "renew"
                self.metrics.subscription_expiry.set(entry.spec.spec_id, expires_at)
                self._schedule_locked(entry, due)
            self._publish_states_locked()
            stale = list(entry.stale_ids)
            entry.stale_ids.clear()
        if changed:
            deliveries.append(delivery)
        # A plain renewal is routine (thousands per quarter hour at scale): debug. Anything else: info.
        emit = log.debug if how == "renewed" and not changed else log.info
        emit(f"subscription.{how}", spec=entry.spec.spec_id, subscription_id=sub_id,
             expires_in=round(expires_at - now, 1), changed=changed and previous is not None,
             renew_in=round(due - now, 1), **logged)
        for old in stale:
            if old != sub_id:
                self._delete_id(session, old)
        return changed and previous is not None

    def _where(self, entry: _Entry, info: dict[str, Any]) -> tuple[str, str, str, str | None]:
        """(id, channel, subscriber key, verification token) of a SubscriptionInfo; ApiError if incomplete."""
        mode = info.get("deliveryMode") or {}
        sub_id = str(info.get("id") or "")
        if self.webhook_address is not None:
            token = self._webhook_token(entry, info)
            if not sub_id or not token:
                raise ApiError(200, None, "WebHook subscription response lacks id, or its token is unknown")
            # The data plane routes by channel: for a WebHook, the subscription id its deliveries name.
            return sub_id, sub_id, "", token
        channel, sub_key = mode.get("address"), mode.get("subscriberKey")
        if not sub_id or not channel or not sub_key:
            raise ApiError(200, None, "subscription response lacks id, deliveryMode.address or subscriberKey")
        return sub_id, str(channel), str(sub_key), None

    def _renewal_due(self, expires_at: float, now: float) -> float:
        """expiry - margin - jitter; the jitter (which spreads renewals of specs created together)
        never takes more than half of the slack between now and the margin."""
        lifetime = expires_at - now
        if self.renewal_margin >= lifetime:
            log.warning("subscription.short_lifetime", lifetime=round(lifetime, 1), margin=self.renewal_margin)
            return now + max(0.1, lifetime * MIN_LIFETIME_FRACTION)
        jitter = self._random.uniform(0, min(self.renewal_jitter, (lifetime - self.renewal_margin) * 0.5))
        return expires_at - self.renewal_margin - jitter

    def _delete_entry(self, entry: _Entry) -> None:
        session = entry.session
        ids = [*entry.stale_ids, *([entry.subscription_id] if entry.subscription_id else [])]
        if session is not None and entry.delete_on_remove:
            for sub_id in ids:
                self._delete_id(session, sub_id)  # raises on transient failure: retried with backoff
                with self._cond:
                    if sub_id in entry.stale_ids:
                        entry.stale_ids.remove(sub_id)
                    if entry.subscription_id == sub_id:
                        entry.subscription_id = None
        with self._cond:
            entry.action = "done"
            entry.state = "deleted"
            for sub_id in ids:
                self._claimed.discard(sub_id)
            if self._removing.get(entry.spec.spec_id) is entry:
                del self._removing[entry.spec.spec_id]
                self._finished[entry.spec.spec_id] = self._status(entry)
                while len(self._finished) > 1000:
                    self._finished.pop(next(iter(self._finished)))
            self._publish_states_locked()

    def _delete_id(self, session: AccountSession, sub_id: str) -> None:
        """Delete one subscription; 404 counts as done. Transient errors propagate (for a retry)."""
        try:
            session.client.delete_subscription(sub_id)
        except ApiError as exc:
            if exc.status == 404:
                self.metrics.deletions.labels("not-found").inc()
                self._forget_inventory(session.name, sub_id)
                return
            self.metrics.deletions.labels("error").inc()
            log.warning("subscription.delete_failed", account=session.name, subscription_id=sub_id,
                        error=str(exc))
            raise
        except Exception:
            self.metrics.deletions.labels("error").inc()
            raise
        self.metrics.deletions.labels("ok").inc()
        self._forget_inventory(session.name, sub_id)
        log.info("subscription.deleted", account=session.name, subscription_id=sub_id)

    # ---- failures --------------------------------------------------------------------------------

    def _failed(self, entry: _Entry, exc: Exception) -> None:
        now = self.clock()
        action = entry.action
        with self._cond:
            entry.failures += 1
            failures = entry.failures
        if action == "renew" and not isinstance(exc, RateLimited):
            self.metrics.renewals.labels("error").inc()
        permission = missing_permission(exc)
        if permission is not None and not entry.removed and action != "delete":
            self._stop_for_missing_permission(entry, exc, permission)
            return
        if isinstance(exc, RateLimited):
            if action == "renew":
                self.metrics.renewals.labels("rate-limited").inc()
            # Silent for the whole penalty, then spread the retries a little.
            penalty = exc.retry_after or 0.0
            delay = penalty + self._random.uniform(0.05, 0.05 + min(1.0, 0.1 * penalty))
            state = "rate-limited"
        elif isinstance(exc, TokenUnavailable):
            delay, state = exc.retry_after + self._random.uniform(0, 0.5), "retrying"
        elif isinstance(exc, IntentNotRecorded | NetworkError) or (
                isinstance(exc, ApiError) and (exc.retryable or exc.status == 401)):
            base = min(MAX_BACKOFF, 2.0 ** (failures - 1))
            delay = base * self._random.uniform(0.5, 1.0)
            if isinstance(exc, ApiError) and exc.retry_after:
                delay = max(delay, exc.retry_after)
            state = "retrying"
        else:
            delay = min(MAX_FAILED_BACKOFF, 10.0 * 2.0 ** (failures - 1)) * self._random.uniform(0.8, 1.0)
            state = "failed"
        if not isinstance(exc, ApiError | NetworkError | TokenUnavailable | IntentNotRecorded):
            log.error("subscription.unexpected_error", exc_info=True, spec=entry.spec.spec_id, action=action)
        else:
            log.warning("subscription.attempt_failed", spec=entry.spec.spec_id, action=action, state=state,
                        error=str(exc), retry_in=round(delay, 2))
        with self._cond:
            if entry.action == "delete" or entry.removed:
                entry.last_error = str(exc)
                self._schedule_locked(entry, now + delay)
                return
            self._to_state_locked(entry, state)
            entry.last_error = str(exc)
            if entry.action == "verify":
                entry.action = "renew"
            self._schedule_locked(entry, now + delay)
            self._publish_states_locked()

    def _stop_for_missing_permission(self, entry: _Entry, exc: Exception, permission: str) -> None:
        """Retrying cannot help until the app is granted `permission`: say so once and stop trying.

        The spec stays `failed` without a retry; changing its filters (or restarting) tries again."""
        error = (f"the RingCentral app lacks the permission {permission} needed by the event filters "
                 f"(grant it to the app, then re-apply the spec): {exc}")
        log.error("subscription.permission_missing", spec=entry.spec.spec_id, account=entry.spec.account,
                  permission=permission, action=entry.action, error=str(exc))
        with self._cond:
            self._to_state_locked(entry, "failed")
            entry.last_error = error
            entry.gen += 1  # cancels a renewal still in the heap

    # ---- inventory -------------------------------------------------------------------------------

    def _inventory(self, session: AccountSession, listed_after: float = -1e18) -> list[dict[str, Any]]:
        """The user's subscriptions, listed at most every INVENTORY_MAX_AGE seconds per account, and
        listed again if the last listing is older than `listed_after`."""
        inv = self._inventories.setdefault(session.name, _Inventory())
        with inv.lock:
            now = self.clock()
            if now - inv.fetched_at > INVENTORY_MAX_AGE or inv.fetched_at < listed_after:
                inv.records = session.client.list_subscriptions()
                inv.fetched_at = now
                log.info("subscription.listed", account=session.name, count=len(inv.records))
            return list(inv.records)

    def _forget_inventory(self, account: str, sub_id: str) -> None:
        inv = self._inventories.get(account)
        if inv is not None:
            with inv.lock:
                inv.records = [r for r in inv.records if str(r.get("id")) != sub_id]

    @staticmethod
    def _status(entry: _Entry) -> SpecStatus:
        return SpecStatus(spec_id=entry.spec.spec_id, account=entry.spec.account, state=entry.state,
                          subscription_id=entry.subscription_id, expires_at=entry.expires_at,
                          renewals=entry.renewals, last_error=entry.last_error)


# ---- helpers -------------------------------------------------------------------------------------


def normalize_filters(filters: Iterable[str], account_id: str, extension_id: str) -> tuple[str, ...]:
    """Comparable form of event filters: `~` expanded, `/restapi/v1.0` prefixed, query sorted, sorted."""
    out = set()
    for raw in filters:
        path, _, query = str(raw).strip().partition("?")
        if path.startswith(("/account/", "/subscription/")):
            path = "/restapi/v1.0" + path
        parts = path.rstrip("/").split("/")
        for i in range(1, len(parts)):
            if parts[i] == "~" and parts[i - 1] in ("account", "accounts"):  # `accounts`: v2, RingSense paths
                parts[i] = account_id
            elif parts[i] == "~" and parts[i - 1] == "extension":
                parts[i] = extension_id
        normalized = "/".join(parts)
        if query:
            normalized += "?" + urlencode(sorted(parse_qsl(query, keep_blank_values=True)))
        out.add(normalized)
    return tuple(sorted(out))


def _parse_time(text: object) -> float | None:
    """Unix seconds of an ISO 8601 time RingCentral sent, or None."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _expires_at(info: dict[str, Any], sent_at: float) -> float:
    """Absolute expiry in local unix time. `expiresIn` (seconds left) counted from when the request
    was sent is immune to clock skew between us and RingCentral; `expirationTime` is the fallback."""
    expires_in = info.get("expiresIn")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        return sent_at + float(expires_in)
    text = info.get("expirationTime")
    if isinstance(text, str):
        try:
            return datetime.fromisoformat(text).timestamp()
        except ValueError:
            pass
    raise ApiError(200, None, "subscription response lacks expiresIn and a parsable expirationTime")
