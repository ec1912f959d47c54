"""Where the search runs: a local Ray started for the search (a short temp dir, no dashboard) or an existing
cluster (``address``), with this package shipped to the workers."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .deps import WORKER_ENV, require_ray

_SESSION_TOKEN: str | None = None


def absolute_storage_path(path: str | os.PathLike[str]) -> str:
    """A storage path Ray accepts: URIs (``s3://…``) unchanged, local paths made absolute.

    A relative local path makes Ray fail with "URI has empty scheme".
    """
    text = os.fspath(path)
    if "://" in text:
        return text
    return str(Path(text).expanduser().resolve())


def _package_dir() -> str:
    return str(Path(__file__).resolve().parents[1])  # the tl_plugin package


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int = 2,
    num_gpus: int | None = None,
    ship_package: bool | None = None,
    log_to_driver: bool = True,
    env: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run the body with Ray: an existing cluster, or a local Ray started (and shut down) here.

    - ``address`` (or the ``RAY_ADDRESS`` environment variable): connect to that cluster; nothing is started.
    - otherwise: start a local Ray with ``num_cpus`` CPUs, no dashboard, and a short temp dir under ``/tmp``
      (Ray's socket paths must stay under the 107-byte AF_UNIX limit); it is shut down and its temp dir removed
      on exit.
    - if Ray is already initialised in this process, it is used as it is and left running.

    Token authentication (on by default in Ray): a local Ray with no token configured (no ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, ``RAY_AUTH_MODE`` or ``~/.ray/auth_token``) would write a new ``~/.ray/auth_token``;
    instead an ephemeral token (one per process) is put in ``RAY_AUTH_TOKEN`` for the session, so nothing is
    written to your home directory. The variables Ray or this function set are restored on exit.

    ``ship_package`` (default: only when connecting to a cluster) uploads this ``tl_plugin`` package to the
    workers (``runtime_env={"py_modules": [...]}``), so a cluster without tl_plugin installed can import it;
    its dependencies (torch, transformers, datasets, the model and data packages) must be installed there.

    Yields:
        `dict`: ``{"address": ..., "local": bool, "temp_dir": ...}``.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield {"address": None, "local": None, "temp_dir": None, "owned": False}
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    ship = (not local) if ship_package is None else ship_package
    runtime_env: dict[str, Any] = {"env_vars": {**WORKER_ENV, **dict(env or {})}}
    if ship:
        runtime_env["py_modules"] = [_package_dir()]
    watched = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    saved = {k: os.environ.get(k) for k in watched}
    temp_dir: str | None = None
    global _SESSION_TOKEN
    try:
        if local:
            if (
                not any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"))
                and not (Path.home() / ".ray" / "auth_token").exists()
            ):
                # Ray caches the token per process: reuse one ephemeral token for every local session.
                _SESSION_TOKEN = _SESSION_TOKEN or secrets.token_hex(32)
                os.environ["RAY_AUTH_TOKEN"] = _SESSION_TOKEN
            temp_dir = tempfile.mkdtemp(prefix="tlray-", dir="/tmp")
            ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=False,
                _temp_dir=temp_dir,
                runtime_env=runtime_env,
                log_to_driver=log_to_driver,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
        yield {"address": address, "local": local, "temp_dir": temp_dir, "owned": True}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
