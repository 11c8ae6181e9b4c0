"""Pseudonymous user ids for log lines, metric labels and tracking.

A raw user id is personal data: it may name a person (an e-mail, an account id).
Logs, metrics and MLflow are read by more people, kept longer and copied further
than the data itself, so a user id reaches them only as a keyed hash:

    hash_user("alice@example.com", salt) == "u:5f0e...": HMAC-SHA256(salt, user_id), 16 hex

Keyed, so nobody without the salt can confirm a guess ("is u:5f0e... alice?") by
hashing candidate ids, as a plain SHA-256 would allow. The same id and salt always
give the same pseudonym, so one user's lines can still be followed through the
gateway and the model services.

Environment:

    ATTNFLOW_USER_SALT       the key (a secret: never in code or params.yaml). Unset, each
                             process draws a random one: pseudonyms are then stable within a
                             process only, and cannot be matched across services or restarts.
    ATTNFLOW_HASH_USER_IDS   "0" / "false" / "no" / "off" to log raw ids (a debugging choice
                             for data you may see; default on).

The served feedback log (`pipelines.feedback`) and the event tables keep raw ids:
they are the data a model learns from, versioned and access-controlled as data.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading

log = logging.getLogger(__name__)

SALT_ENV = "ATTNFLOW_USER_SALT"
ENABLED_ENV = "ATTNFLOW_HASH_USER_IDS"
PREFIX = "u:"
DIGEST_HEX = 16  # 64 bits: plenty to tell users apart in logs, short enough to read

_OFF = {"0", "false", "no", "off"}
_process_salt: bytes | None = None
_salt_lock = threading.Lock()


def hash_user(user_id: object, salt: str | bytes) -> str:
    """`u:` + the first 16 hex digits of HMAC-SHA256(salt, str(user_id))."""
    if isinstance(salt, str):
        salt = salt.encode()
    if not salt:
        raise ValueError("an empty salt would make the pseudonym a plain, guessable hash")
    digest = hmac.new(salt, str(user_id).encode("utf-8", "surrogatepass"), hashlib.sha256)
    return PREFIX + digest.hexdigest()[:DIGEST_HEX]


def enabled() -> bool:
    """Whether user ids are hashed (`ATTNFLOW_HASH_USER_IDS`, default on)."""
    return os.environ.get(ENABLED_ENV, "1").strip().lower() not in _OFF


def salt() -> bytes:
    """`ATTNFLOW_USER_SALT`, or a random salt drawn once for this process."""
    value = os.environ.get(SALT_ENV)
    if value:
        return value.encode()
    global _process_salt
    with _salt_lock:
        if _process_salt is None:
            _process_salt = secrets.token_bytes(32)
            log.warning(
                "%s is not set: user ids in logs are hashed with a random per-process salt "
                "(pseudonyms will not match across services or restarts)",
                SALT_ENV,
            )
        return _process_salt


def user_ref(user_id: object) -> str:
    """What a log line or metric label may say about a user: the pseudonym, or the raw id
    when hashing is switched off. None stays "-"."""
    if user_id is None:
        return "-"
    if not enabled():
        return str(user_id)
    return hash_user(user_id, salt())


def redact(text: str, user_ids: list[object] | tuple[object, ...] | set[object]) -> str:
    """`text` with every occurrence of the given raw user ids replaced by their pseudonyms.

    For messages built elsewhere (an exception's text) that may quote a user id.
    """
    if not enabled():
        return text
    ids = sorted({str(u) for u in user_ids if u is not None and str(u)}, key=len, reverse=True)
    if not ids:
        return text
    pattern = re.compile("|".join(re.escape(u) for u in ids))
    return pattern.sub(lambda m: user_ref(m.group(0)), text)
