"""Micro-benchmark of the data-plane core: `Pipeline.process` against a naive implementation.

Run: `python -m tests.bench.pipeline_micro [--seconds 3] [--messages 1000]`; prints one JSON object.

Workload: realistic encrypted notifications of about 1 KiB (instant SMS, telephony session,
detailed presence, message-store change, in rotation; each with its own uuid and timestamp), one
key, one thread. The naive baseline is what a straightforward implementation does per message: a
new AES cipher, stdlib `json`, routing by regular expressions, and pure-Python `jsonschema`
validation (`jsonschema.validate`, which also checks the schema each call; a variant with the
pure-Python validator compiled once is measured too, so the ratio is not flattered).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import random
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from Crypto.Cipher import AES

from ingest.data.catalogue import Catalogue, default_catalogue, schemas_dir
from ingest.data.crypto import Cipher, pkcs7_unpad
from ingest.data.pipeline import ChannelContext, Pipeline
from ingest.model import Delivery
from ingest.topology import TopicNames

KEY = base64.b64encode(b"bench-key-16byte").decode()
ACCOUNT = "809646016"


def _stamp(rng: random.Random) -> str:
    secs = 1_700_000_000 + rng.randrange(10_000_000)
    tail = "Z" if rng.random() < 0.5 else "+0000"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rng.randrange(1000):03d}{tail}"


def _notification(i: int, rng: random.Random) -> dict[str, Any]:
    ext = str(rng.randrange(10**9, 10**10))
    envelope = {"uuid": str(uuid.UUID(int=rng.getrandbits(128))) if i % 2 else str(rng.getrandbits(62)),
                "timestamp": _stamp(rng), "subscriptionId": "53300e7c-5e69-42bf-ab4d-179aabc6e869", "ownerId": ext}
    phone = {"phoneNumber": f"+1650{rng.randrange(10**7):07d}", "name": "Jordan Example", "location": "Moss Beach, CA"}
    kind = i % 4
    if kind == 0:
        event = f"/restapi/v1.0/account/~/extension/{ext}/message-store/instant?type=SMS"
        body: dict[str, Any] = {
            "id": str(rng.getrandbits(40)), "to": [phone], "from": dict(phone, name="Alex Sender"), "type": "SMS",
            "creationTime": _stamp(rng), "lastModifiedTime": _stamp(rng), "readStatus": "Unread",
            "priority": "Normal", "direction": "Inbound", "availability": "Alive", "messageStatus": "Received",
            "subject": "Hi there, are we still on for the quarterly review tomorrow at ten? " * 2,
            "conversationId": str(rng.getrandbits(62)),
            "attachments": [{"uri": f"/restapi/v1.0/account/~/extension/{ext}/message-store/1/content/1",
                             "id": str(rng.getrandbits(40)), "type": "Text", "contentType": "text/plain",
                             "size": 140}]}
    elif kind == 1:
        event = f"/restapi/v1.0/account/{ACCOUNT}/extension/{ext}/telephony/sessions"
        party = {"accountId": ACCOUNT, "extensionId": ext, "id": f"p-{rng.getrandbits(64):x}-2",
                 "direction": "Inbound", "to": dict(phone, extensionId=ext), "from": {"phoneNumber": "+14083388064"},
                 "status": {"code": "Answered", "rcc": False}, "park": {}, "missedCall": False,
                 "standAlone": False, "muted": False}
        body = {"sequence": rng.randrange(100), "sessionId": str(rng.getrandbits(40)),
                "telephonySessionId": f"s-{rng.getrandbits(128):x}", "serverId": "10.13.22.28.TAM",
                "eventTime": _stamp(rng), "parties": [party, dict(party, direction="Outbound")],
                "origin": {"type": "Call"}}
    elif kind == 2:
        event = f"/restapi/v1.0/account/~/extension/{ext}/presence?detailedTelephonyState=true"
        call = {"id": f"{rng.getrandbits(128):x}", "direction": "Inbound", "queueCall": True,
                "from": "+18775380038", "fromName": "John Wang", "to": "+18445810019",
                "telephonyStatus": "CallConnected", "startTime": _stamp(rng), "sessionId": str(rng.getrandbits(36)),
                "partyId": "cs171843418296416309-2", "telephonySessionId": "Y3MxNjk4ODA5MTYxMzUyOTU5OUAxMC4zMi40NS44NA"}
        body = {"extensionId": ext, "telephonyStatus": "CallConnected", "sequence": rng.randrange(10**4),
                "presenceStatus": "Busy", "userStatus": "Available", "meetingStatus": "Disconnected",
                "dndStatus": "TakeAllCalls", "allowSeeMyPresence": True, "ringOnMonitoredCall": False,
                "pickUpCallsOnHold": False, "activeCalls": [call, dict(call, direction="Outbound")],
                "totalActiveCalls": 2}
    else:
        event = f"/restapi/v1.0/account/{ACCOUNT}/extension/{ext}/message-store"
        body = {"accountId": int(ACCOUNT), "extensionId": int(ext), "lastUpdated": _stamp(rng),
                "changes": [{"type": t, "newCount": rng.randrange(3), "updatedCount": rng.randrange(3),
                             "newMessageIds": [rng.getrandbits(40) for _ in range(6)]}
                            for t in ("SMS", "VoiceMail", "Fax", "Pager")]}
    return {**envelope, "event": event, "body": body}


def workload(count: int, seed: int = 7) -> list[str]:
    """`count` encrypted notifications (Base64 strings, as the PubNub SDK hands them over)."""
    rng = random.Random(seed)
    cipher = Cipher(KEY)
    return [cipher.encrypt(json.dumps(_notification(i, rng), separators=(",", ":")).encode()) for i in range(count)]


class NaivePipeline:
    """The straightforward version: nothing cached between messages except the parsed schema files."""

    ROUTES = (("instant-message", r"/message-store/instant"), ("message-store", r"/message-store"),
              ("detailed-presence", r"/presence\?.*detailedTelephonyState=true"), ("presence", r"/presence"),
              ("telephony-sessions", r"/telephony/sessions"))

    def __init__(self, compiled: bool) -> None:
        import jsonschema  # type: ignore[import-untyped]  # baseline only; no stubs installed
        from referencing import Registry, Resource

        directory = schemas_dir()
        docs = {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json") if p.name != "catalogue.json"}
        self.registry: Registry[Any] = Registry().with_resources(
            (doc["$id"], Resource.from_contents(doc)) for doc in docs.values())
        self.schemas = docs
        self.compiled = {n: jsonschema.Draft202012Validator(d, registry=self.registry) for n, d in docs.items()}
        self.use_compiled = compiled
        self.jsonschema = jsonschema

    def process(self, payload: str, key_b64: str, account: str, timetoken: int) -> tuple[str, bytes, bytes,
                                                                                           list[tuple[str, bytes]]]:
        aes = AES.new(base64.b64decode(key_b64), AES.MODE_ECB)  # new cipher per message
        try:
            raw = pkcs7_unpad(aes.decrypt(base64.b64decode(payload, validate=True)))
            doc = json.loads(raw)
        except (binascii.Error, ValueError):
            return "dead-letter", account.encode(), payload.encode(), []
        family = next((name for name, pattern in self.ROUTES if re.search(pattern, doc["event"])), "envelope")
        try:
            if self.use_compiled:
                self.compiled[family].validate(doc)
            else:
                self.jsonschema.validate(doc, self.schemas[family], cls=self.jsonschema.Draft202012Validator,
                                         registry=self.registry)
        except self.jsonschema.ValidationError:
            return "dead-letter", account.encode(), payload.encode(), []
        match = re.match(r"/restapi/v1\.0/account/(\d+)/", doc["event"])
        headers = [("event", doc["event"].encode()), ("family", family.encode()),
                   ("subscription-id", doc.get("subscriptionId", "").encode()), ("uuid", doc["uuid"].encode()),
                   ("timestamp", doc["timestamp"].encode()), ("timetoken", str(timetoken).encode()),
                   ("schema-id", self.schemas[family]["$id"].encode()), ("spec-id", b"bench/spec")]
        return f"rc.{family}", (match.group(1) if match else account).encode(), raw, headers


def _rate(run: Callable[[str, int], object], messages: Sequence[str], seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for i, payload in enumerate(messages):
            run(payload, i)
        done += len(messages)
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per variant")
    parser.add_argument("--messages", type=int, default=1000, help="distinct notifications in the workload")
    args = parser.parse_args(argv)

    messages = workload(args.messages)
    catalogue: Catalogue = default_catalogue()
    pipeline = Pipeline(catalogue, TopicNames("rc", catalogue=catalogue))
    ctx = ChannelContext.from_delivery(Delivery("bench/spec", ACCOUNT, "sub", "sub-c", "ch", KEY, 0.0))
    outcomes = [pipeline.process(m, ctx, i) for i, m in enumerate(messages)]
    errors = [o.error for o in outcomes if o.error]
    if errors:
        raise SystemExit(f"workload is not valid: {errors[:3]}")
    plain_sizes = [len(o.value) for o in outcomes]

    naive = NaivePipeline(compiled=False)
    naive_compiled = NaivePipeline(compiled=True)
    small = messages[: max(1, min(len(messages), 200))]  # the naive variant is slow; fewer distinct messages do
    result: dict[str, float] = {
        "messages": len(messages),
        "avg_plaintext_bytes": round(sum(plain_sizes) / len(plain_sizes)),
        "avg_ciphertext_chars": round(sum(map(len, messages)) / len(messages)),
        "pipeline_per_s": round(_rate(lambda p, i: pipeline.process(p, ctx, i), messages, args.seconds)),
        "naive_per_s": round(_rate(lambda p, i: naive.process(p, KEY, ACCOUNT, i), small, args.seconds)),
        "naive_compiled_validator_per_s": round(
            _rate(lambda p, i: naive_compiled.process(p, KEY, ACCOUNT, i), messages, args.seconds)),
    }
    result["speedup_vs_naive"] = round(result["pipeline_per_s"] / result["naive_per_s"], 1)
    result["speedup_vs_naive_compiled"] = round(result["pipeline_per_s"] / result["naive_compiled_validator_per_s"], 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
