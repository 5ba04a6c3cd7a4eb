"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """Something the user can fix (missing home, bad flag, port in use)."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def _known_errors() -> tuple[type[BaseException], ...]:
    from flnode.protocol.errors import ProtocolError

    errs: list[type[BaseException]] = [UserError, ProtocolError, OSError]
    for mod, name in (("flnode.node.chain.store", "StoreError"), ("flnode.node.config", "ConfigError"),
                      ("flnode.node.signer", "SignGuardError")):
        try:
            m = __import__(mod, fromlist=[name])
            errs.append(getattr(m, name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def user_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _known_errors() as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
