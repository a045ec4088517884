"""What names a prompt-cache entry: session keys, tenants, scopes.

A session key (``prompt_cache_key``, ``X-Session-ID``, ``user``) and a ``cache_salt`` are
checked at the HTTP boundary by ``check_key``: UTF-8 text of at most ``MAX_KEY_CHARS``
characters without control characters. A *scope* is the pool a request reads and writes: its
tenant (a digest of its API key, "" without keys) and, with a salt, a digest of the salt.
Plain string functions; nothing here knows HTTP or the engine.
"""

from __future__ import annotations

import hashlib
import unicodedata

MAX_KEY_CHARS = 256


def check_key(value: str) -> str:
    """Check a session key or cache salt: UTF-8 text, short, no control characters.

    Args:
        value: The key.

    Returns:
        The key, unchanged.

    Raises:
        ValueError: Why it is refused (the message never repeats the value).
    """
    if len(value) > MAX_KEY_CHARS:
        raise ValueError(f"must be at most {MAX_KEY_CHARS} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (it holds a lone surrogate)") from None
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("must not contain control characters")
    return value


def digest(*parts: str) -> str:
    """A hex digest of strings, for file names and scopes.

    Args:
        *parts: The strings (joined with a separator no key may hold).

    Returns:
        64 hex digits.
    """
    # surrogatepass: any str hashes, even one the boundary should have refused.
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def scope_of(tenant: str, salt: str | None = None) -> str:
    """The pool a request reads and writes: its tenant, and its ``cache_salt`` if any.

    Args:
        tenant: The caller's tenant id ("" without API keys); never contains ``:``.
        salt: The request's ``cache_salt``.

    Returns:
        ``tenant`` or ``tenant:<digest of salt>``.
    """
    return f"{tenant}:{digest(salt)[:32]}" if salt else tenant


def prompt_entry_key(session: str, prompt: int) -> str:
    """The entry of a request's ``prompt``-th prompt within a session.

    Prompt 0 keeps the session's own entry, so a chat or a single-prompt completion reads and
    writes the entry its next turn finds. Each further prompt of a multi-prompt completion has
    an entry of its own, ``key#p``, where it would otherwise overwrite prompt 0's; it is
    listed under that name and deleted with its session (``belongs_to``).

    Args:
        session: The session key.
        prompt: The prompt's number.

    Returns:
        The entry's key.
    """
    return f"{session}#{prompt}" if prompt > 0 else session


def belongs_to(entry_key: str, session: str) -> bool:
    """Whether an entry is the session's own or one of its further prompts' (``key#p``).

    Args:
        entry_key: An entry's key.
        session: A session key.

    Returns:
        True for ``session`` itself and ``session#1``, ``session#2``, ...
    """
    if entry_key == session:
        return True
    head, sep, number = entry_key.rpartition("#")
    return bool(sep) and head == session and number.isascii() and number.isdigit()


def tenant_of(scope: str) -> str:
    """The tenant part of a scope.

    Args:
        scope: From ``scope_of``.

    Returns:
        The tenant id.
    """
    return scope.partition(":")[0]
