"""The one place where exceptions become errnos: only FUSEError leaves a handler.

Store errors carry their errno; an OSError keeps its own; anything else is a
bug, logged with its traceback once and answered with EIO, never a crash of
the filesystem.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
from ferryfs.store.errors import CorruptChunk, OpError

log = logging.getLogger("ferryfs.fs")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class AccessDenied(OpError):
    """A control xattr asked for by someone other than the mount's owner or root."""

    errno = errno.EACCES


class Failsafe(OpError):
    """A corrupt chunk that could not be healed: EIO (and writes refused from now on).
    Not a CorruptChunk: that one was counted already."""

    errno = errno.EIO


def fuse_errors(fn: F) -> F:
    """Decorate an Operations handler so every failure is a FUSEError."""

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except CorruptChunk as e:
            # Only the store-backed Operations has a failsafe to trip; the
            # read-only Phase 3 tree has none.
            on_corrupt = getattr(self, "on_corrupt", None)
            if on_corrupt is not None:
                on_corrupt(e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OpError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]
