"""Checks ``tl-plugin search`` makes before it connects to Ray, so that a wrong setting is one line, not a hang.

- `check_address`: an ``--address`` (or ``$RAY_ADDRESS``) with nothing listening there. Ray's own connect retries
  for a long time (minutes with some settings) before it gives up; a TCP probe of the GCS (or Ray Client) port
  answers in at most ``timeout`` seconds.
- `check_storage_path`: a local ``--storage_path`` that cannot be written (a read-only folder, a path under a
  file). Ray would only fail when the first trial reports; this fails before any trial starts.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from .errors import UsageError

__all__ = ["check_address", "check_storage_path", "split_address"]

#: Default ports: the GCS of ``ray start --head`` and the Ray Client server (``ray://``).
GCS_PORT = 6379
CLIENT_PORT = 10001


def split_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address (``host:port``, ``ray://host:port``, ``[::1]:port``); `None` for the
    addresses Ray resolves itself (``auto``, ``local``)."""
    text = address.strip()
    if text in ("auto", "local", ""):
        return None
    client = text.startswith("ray://")
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:  # no port given
        host, port = text, str(CLIENT_PORT if client else GCS_PORT)
    host = host.strip("[]")
    if not port.isdigit():
        raise UsageError(f"--address {address}: the port {port!r} is not a number (expected HOST:PORT)")
    return host, int(port)


def check_address(address: str | None, timeout: float = 10.0) -> None:
    """Raise `UsageError` within ``timeout`` seconds when no Ray cluster listens at ``address`` (or
    ``$RAY_ADDRESS`` when ``address`` is `None`); nothing to check for a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return
    target = split_address(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise UsageError(
            f"--address {address}: no Ray cluster answers at {host}:{port} ({reason}); start one with "
            f"`ray start --head --port {port}` or pass the address that `ray start --head` printed"
        ) from None


def check_storage_path(storage_path: str) -> None:
    """Raise `UsageError` when a local storage path cannot be created or written; URIs (``s3://``) are left to
    Ray. The folder is created (Ray would create it too)."""
    if "://" in storage_path and not storage_path.startswith("file://"):
        return
    path = Path(storage_path.removeprefix("file://"))
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".tl-write-check-"):
            pass
    except OSError as err:
        raise UsageError(
            f"--storage_path {storage_path}: not writable ({err.strerror or err}); pass a folder you can write "
            "to (on a cluster: one every node reaches)"
        ) from None
