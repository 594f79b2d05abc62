"""Reaching the Hugging Face hub, or working from the local cache when it cannot be reached.

Without a network, ``from_pretrained`` and ``load_dataset`` retry each request with back-off
before they fall back to the cache or fail: 30-50 seconds of warnings for a mistyped hub id, and
as long for a model that is cached. :func:`cache_only_if_unreachable` checks once whether the
hub's endpoint accepts a connection (about a millisecond when DNS fails, at most ``timeout``) and,
when it does not, runs the load in the libraries' own offline mode: cached files load at once and
anything else fails at once, with a message that says why.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from urllib.parse import urlparse

_REACHABLE: dict[str, bool] = {}   # endpoint -> whether it accepted a connection (checked once per process)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT``, by default https://huggingface.co) accepts a TCP connection.

    Behind a proxy (``HTTPS_PROXY`` or ``ALL_PROXY`` set) a direct connection says nothing, so the hub
    counts as reachable and the libraries find out through the proxy.
    """
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    if endpoint not in _REACHABLE:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            _REACHABLE[endpoint] = True
        except (OSError, ValueError):
            _REACHABLE[endpoint] = False
    return _REACHABLE[endpoint]


def offline() -> bool:
    """Whether hub loads run from the local cache only (``HF_HUB_OFFLINE``, or set by the block below)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def cache_only_if_unreachable():
    """Inside this block, hub loads use only the local cache when the hub cannot be reached.

    Sets huggingface_hub's (and, when imported, datasets') offline flag for the block and puts
    it back after, so a later load in the same process checks again only if the first check
    said the hub was reachable (the result is kept).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    modules = [constants] + [sys.modules[m] for m in ("datasets.config",) if m in sys.modules]
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved, strict=True):
            m.HF_HUB_OFFLINE = value


def unreachable_reason() -> str | None:
    """Why a hub load failed when the cause is the missing network (worded to follow the name), else None."""
    from huggingface_hub import constants

    if constants.ENDPOINT in _REACHABLE and not _REACHABLE[constants.ENDPOINT]:
        return f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached from here and it is not in the local cache"
    if offline():
        return "HF_HUB_OFFLINE is set (no hub access) and it is not in the local cache"
    return None
