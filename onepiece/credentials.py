"""The data plane's credentials: the contract the broker, the workers and the transports speak.

The broker gives each worker a random *data key* when it registers (REGISTERED ``data_key``,
over the control plane, encrypted with CURVE where it is on). Everything a peer must show
before a worker takes its data is a MAC made with that key, which only the broker and the
key's owner know; the broker hands each credential, over the same control plane, only to the
worker it tells to send:

* **connection** (checked at the transport's handshake, before a byte of data is read):
  ``link_key(consumer key, producer id)``, given to the producer (SEND ``link``, TASK
  ``checkpoint_link``). The consumer sends a fresh random nonce; the producer answers with its
  id and ``link_proof(link, nonce)``; the consumer derives the same link from its own key and
  compares. A stranger cannot answer, and a recorded handshake answers no other nonce.
* **message** (checked by the worker before it keeps a message): ``data_auth`` binds the
  job, the producing and consuming stages and the binding, so a peer that may connect still
  cannot deliver data for a job it was never told to send here; ``checkpoint_auth`` does the
  same for a checkpoint left with a holder.

Invariants:

C1 A consumer with a key accepts a connection only from a producer that answered its own
   fresh nonce with the proof of ``link_key(key, principal)``, and keeps only messages whose
   ``auth`` is the MAC of exactly their job, stages and binding with its key.
C2 Every credential is bound to the receiver's key, and a worker gets a new key each time it
   registers: credentials of an earlier incarnation (or of another receiver) are worthless.
C3 A consumer without a key (no broker has given it one) checks nothing, as before keys.
C4 Comparisons are constant-time (``hmac.compare_digest``); nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

KEY_BYTES = 32  # a worker's data key
NONCE_BYTES = 16  # a handshake's challenge
MAC_HEX = 32  # a credential's length in hex (128 bits)


def _mac(key: bytes, text: str) -> str:
    # keyed BLAKE2b is a MAC by design (RFC 7693) and ~3x cheaper than HMAC-SHA256 here, where the
    # broker makes one per task edge; 128 bits are plenty for a credential that is never reused
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), key=key, digest_size=16).hexdigest()


def new_key() -> bytes:
    """A worker's data key (the broker makes one per registration)."""
    return os.urandom(KEY_BYTES)


def data_auth(key: bytes, job: str, from_stage: str, to_stage: str, binding: int | None) -> str:
    """The credential of data for ``job`` from ``from_stage`` to the ``to_stage`` whose key is ``key``."""
    return _mac(key, f"data|{job}|{from_stage}|{to_stage}|{'' if binding is None else binding}")


def checkpoint_auth(key: bytes, job: str, from_stage: str, holder_stage: str) -> str:
    """The credential of a checkpoint of ``job``'s ``from_stage`` left with a holder of ``holder_stage``."""
    return _mac(key, f"checkpoint|{job}|{from_stage}|{holder_stage}")


def link_key(key: bytes, principal: str) -> str:
    """What lets worker ``principal`` connect to the worker whose key is ``key`` (hex)."""
    return _mac(key, f"link|{principal}")


def link_proof(link: str, nonce: bytes) -> str:
    """A producer's answer to the consumer's ``nonce``, made with its ``link``."""
    return _mac(link.encode("ascii", "replace"), f"proof|{nonce.hex()}")


def challenge() -> bytes:
    """A consumer's fresh nonce for one handshake."""
    return os.urandom(NONCE_BYTES)


@dataclass(frozen=True)
class Credential:
    """What a producer shows when it connects: who it is and the link the broker gave it."""

    principal: str
    link: str

    def answer(self, nonce: bytes) -> dict[str, str]:
        """The handshake fields that prove this credential for ``nonce``."""
        return {"principal": self.principal, "proof": link_proof(self.link, nonce)}


def answer(credential: Credential | None, nonce: object) -> dict[str, str]:
    """The handshake fields a producer sends for ``nonce`` (nothing without a credential or a nonce)."""
    if credential is None or not isinstance(nonce, bytes):
        return {}
    return credential.answer(nonce)


def refusal(key: bytes | None, nonce: bytes, hello: dict) -> str | None:
    """Why a consumer with ``key`` refuses a handshake whose ``hello`` answered ``nonce``;
    None if it accepts it (always without a key: C3)."""
    if key is None:
        return None
    principal, proof = hello.get("principal"), hello.get("proof")
    if not isinstance(principal, str) or not isinstance(proof, str):
        return "no data-plane credential (the broker gives one to the workers it tells to send here)"
    if not authentic(proof, link_proof(link_key(key, principal), nonce)):
        return f"the credential of {principal[:64]!r} is not one the broker gave for this worker"
    return None


def authentic(got: object, want: str) -> bool:
    """Whether a message's ``auth`` field ``got`` is the credential ``want`` (constant time)."""
    return isinstance(got, str) and hmac.compare_digest(got.encode("ascii", "replace"), want.encode("ascii"))
