"""AES-128-ECB/PKCS#7 against RingCentral's published test vector (reference §2.3)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.crypto import Cipher, DecryptError

VECTOR_KEY = "e0bMTqmumPfFUbwzppkSbA=="
VECTOR_CIPHERTEXT = (
    "gkw8EU4G1SDVa2/hrlv6+0ViIxB7N1i1z5MU/Hu2xkIKzH6yQzhr3vIc27IAN558kTOkacqE5DkLpRdnN1orwtIBsUHmPMkMWTOLDzVr6eRk"
    "+2Gcj2Wft7ZKrCD+FCXlKYIoa98tUD2xvoYnRwxiE2QaNywl8UtjaqpTk1+WDImBrt6uabB1WICY/qE0It3DqQ6vdUWISoTfjb+vT5h9kfZx"
    "WYUP4ykN2UtUW1biqCjj1Rb6GWGnTx6jPqF77ud0XgV1rk/Q6heSFZWV/GP23/iytDPK1HGJoJqXPx7ErQU="
)
VECTOR_PLAINTEXT = (
    b'{"timestamp":"2014-03-12T20:47:54.712+0000","body":{"extensionId":402853446008,"telephonyStatus":"OnHold"},'
    b'"event":"/restapi/v1.0/account/~/extension/402853446008/presence",'
    b'"uuid":"db01e7de-5f3c-4ee5-ab72-f8bd3b77e308"}'
)


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
