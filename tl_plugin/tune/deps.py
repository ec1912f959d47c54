"""Optional dependencies of the search (Ray, matplotlib), imported when first needed, with the install hint;
the environment every trial runs with; the bundled model's folder."""

from __future__ import annotations

from typing import Any

from ..testing import bundled_model_path

RAY_INSTALL_HINT = "pip install 'tl-plugin[ray]'"
PLOT_INSTALL_HINT = "pip install 'tl-plugin[plot]'"

#: Environment every trial runs with (offline Hugging Face libraries, quiet tokenizers).
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def require_ray() -> Any:
    """Import and return ``ray`` with ``ray.tune`` loaded; a clear `ImportError` with the install hint otherwise."""
    try:
        import ray
        import ray.tune  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"The Ray Tune search needs Ray Tune, which is not installed ({err}). Install it with: "
            f"{RAY_INSTALL_HINT}"
        ) from err
    return ray


def require_matplotlib() -> Any:
    """Import matplotlib with the non-interactive Agg backend and return ``matplotlib.pyplot``."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            f"Plotting the search results needs matplotlib, which is not installed ({err}). Install it with: "
            f"{PLOT_INSTALL_HINT}"
        ) from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt




def _resolve_model_path(model_path: str | None) -> str:
    """`model_path`, or the bundled all-MiniLM-L6-v2's folder (resolved where it runs: on a cluster, each node's)."""
    return model_path or bundled_model_path()


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value
