"""The token of a local Ray cluster a job starts, kept out of the user's home.

Ray turns token authentication on for a cluster that ``ray.init()`` starts and, where it finds
no token, writes a new one to ``~/.ray/auth_token`` and warns about it on stderr. A job asked
for ``--cluster ray`` was not asked to write there. When it starts a new local cluster, it keeps
the authentication but hands Ray a token in this process's environment instead (its cluster's
processes inherit it), and puts the environment back when the cluster stops.

Ray's own rules hold wherever the user has a say (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH`` set, a token in ``~/.ray`` already) and when Ray will connect to a
cluster that runs (``RAY_ADDRESS``, or one found on this machine), whose token is its own.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

TOKEN_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# one per process: Ray's token loader keeps the first token it read
_TOKEN = secrets.token_hex(32)


def _home_token_exists() -> bool:
    try:
        return (Path.home() / ".ray" / "auth_token").exists()
    except (RuntimeError, OSError):  # no home to find
        return False


def _starts_a_new_cluster(ray_address: str | None) -> bool:
    """Whether ``ray.init(address=ray_address)`` starts a cluster rather than joining one."""
    if ray_address is not None:
        return False
    try:
        from ray._private import services

        return services.canonicalize_bootstrap_address(None) is None
    except Exception:  # Ray's to report when it connects (or a Ray without this function)
        return False


def _reload_ray_settings() -> None:
    # Ray reads the authentication mode and the token once and caches them; it reloads both
    # itself the same way when it turns authentication on for a new cluster
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def use_a_process_token(ray_address: str | None) -> Callable[[], None] | None:
    """Before ``ray.init``: where it would start a cluster and write a token to the home, give
    it one in the environment. Returns what puts the environment back, or None when nothing
    was changed."""
    if any(os.environ.get(name) for name in TOKEN_VARIABLES) or _home_token_exists():
        return None
    if not _starts_a_new_cluster(ray_address):
        return None

    ours = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _TOKEN}

    def drop_ours() -> None:
        for name in ours:
            os.environ.pop(name, None)

    def put_back() -> None:
        drop_ours()
        _reload_ray_settings()

    os.environ.update(ours)
    try:
        _reload_ray_settings()
    except Exception:  # a Ray without these internals: its own rules, as before
        drop_ours()
        return None
    return put_back
