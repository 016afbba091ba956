"""Progress bars that ``TQDM_DISABLE=1`` switches off whenever it is set. tqdm itself reads its environment once, at
import, so a variable set later (the escape study sets it before forking its workers) would be ignored."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def bars_disabled() -> bool:
    """Whether ``$TQDM_DISABLE`` asks for no bars, read now."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")


def progress_bar(*args, show: bool = True, **kwargs) -> tqdm:
    """``tqdm(*args, **kwargs)``, shown when ``show`` (e.g. on rank 0 only) and ``$TQDM_DISABLE`` is not set."""
    return tqdm(*args, disable=not show or bars_disabled(), **kwargs)
