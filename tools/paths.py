"""Where ferryfs puts things by default: the store is `SRC.ferry`, beside SRC.

Its own module so that `ferryfs mount` need not import the migrate command (and
the store, rich and the rest) only to name a directory.
"""

from __future__ import annotations

import os


def default_store(src: str) -> str:
    return os.path.abspath(src).rstrip("/") + ".ferry"
