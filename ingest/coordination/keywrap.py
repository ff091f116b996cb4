"""Subscription AES keys in the state topic, wrapped so that a reader of the topic learns nothing.

A restarted worker must read its former channel again (PubNub keeps a channel's buffer after the
subscription ends), and that needs the channel's AES key, which RingCentral no longer hands out
once the subscription is gone or rotated. The state record therefore carries the key, wrapped:

- AES-256-GCM (`cryptography`, already the worker's AES library) with a random 96-bit nonce;
- its key derived by HKDF-SHA256 with a fixed label from the RingCentral app's client secret,
  which every worker of a deployment already holds, so no new secret is needed;
- the spec id and the channel as associated data: a wrapped key copied into another record, or
  onto another channel, does not unwrap.

Rotating the client secret makes older records unreadable: `unwrap` raises `UnwrapError` and the
worker reports the channel's unread window as a gap (docs/records.md, docs/deployment.md).
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = "v1"
_LABEL = b"ingest state-record subscription key wrap v1"
_NONCE_BYTES = 12


class UnwrapError(ValueError):
    """A wrapped key that cannot be unwrapped: another client secret, or a damaged record."""


class KeyWrapper:
    """Wraps and unwraps subscription keys with a key derived from the client secret."""

    def __init__(self, client_secret: str) -> None:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL).derive(client_secret.encode())
        self._aead = AESGCM(derived)

    def wrap(self, key: str, spec_id: str, channel: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, key.encode(), _associated(spec_id, channel))
        return f"{VERSION}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def unwrap(self, wrapped: str, spec_id: str, channel: str) -> str:
        version, _, body = wrapped.partition(".")
        if version != VERSION:
            raise UnwrapError(f"unknown key wrapping {version!r}")
        try:
            raw = base64.urlsafe_b64decode(body)
            key = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _associated(spec_id, channel))
        except (binascii.Error, ValueError, InvalidTag):
            raise UnwrapError("the wrapped key does not open with this deployment's client secret") from None
        return key.decode()


def _associated(spec_id: str, channel: str) -> bytes:
    return f"{spec_id}\n{channel}".encode()
