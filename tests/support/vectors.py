"""RingCentral's published AES test vector (reference: ringcentral-push-api.md §2.3), used by the SDKs'
own tests: a presence notification encrypted with AES-128-ECB/PKCS#7 under VECTOR_KEY."""

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
