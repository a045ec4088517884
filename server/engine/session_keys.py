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


def tenant_of(scope: str) -> str:
    """The tenant part of a scope.

    Args:
        scope: From ``scope_of``.

    Returns:
        The tenant id.
    """
    return scope.partition(":")[0]
