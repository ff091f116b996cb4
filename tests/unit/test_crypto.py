"""AES-128-ECB/PKCS#7 against RingCentral's published test vector (reference §2.3)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.data.crypto import Cipher, DecryptError
from tests.support.vectors import VECTOR_CIPHERTEXT, VECTOR_KEY, VECTOR_PLAINTEXT


def test_vector_decrypts_exactly() -> None:
    assert Cipher(VECTOR_KEY).decrypt(VECTOR_CIPHERTEXT) == VECTOR_PLAINTEXT
    assert len(VECTOR_PLAINTEXT) == 219


def test_vector_encrypts_byte_for_byte() -> None:
    assert Cipher(VECTOR_KEY).encrypt(VECTOR_PLAINTEXT) == VECTOR_CIPHERTEXT


@given(st.binary(max_size=2048))
def test_round_trip(plaintext: bytes) -> None:
    cipher = Cipher(VECTOR_KEY)
    assert cipher.decrypt(cipher.encrypt(plaintext)) == plaintext


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("not base64!!", "bad-base64"),
        (base64.b64encode(b"short").decode(), "bad-length"),
        ("", "bad-length"),
        (Cipher("AAAAAAAAAAAAAAAAAAAAAA==").encrypt(b'{"a":1}'), "bad-padding"),  # wrong key
    ],
)
def test_failures_are_typed(payload: str, reason: str) -> None:
    with pytest.raises(DecryptError) as info:
        Cipher(VECTOR_KEY).decrypt(payload)
    assert info.value.reason == reason
    assert VECTOR_KEY not in str(info.value)
