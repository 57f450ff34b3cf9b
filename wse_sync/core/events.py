"""Small event plumbing: the channel emitter and the ``when`` binder."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, FrozenSet, List, Literal, Optional, Union

from .errors import WSE_ERROR, WseError

__all__ = ["Emitter", "RpcHandlers", "When", "call_with_kwargs", "EVENTS"]

EVENTS = ("joined", "left", "connected", "disconnected", "error", "ignored")


class RpcHandlers:
    """One handler per RPC name (the server's and the client's ``register``)."""

    def __init__(self) -> None:
        self._handlers: Dict[str, Callable[..., Any]] = {}

    def register(self, rp: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Raises RP_ALREADY_REGISTERED, or TypeError for a handler that is not callable."""
        if rp in self._handlers:
            raise WseError(WSE_ERROR.RP_ALREADY_REGISTERED, {"rpc": rp})
        if not callable(handler):
            raise TypeError("handler must be callable")
        self._handlers[rp] = handler
        return handler

    def unregister(self, rp: str) -> None:
        """Raises RP_NOT_REGISTERED."""
        if self._handlers.pop(rp, None) is None:
            raise WseError(WSE_ERROR.RP_NOT_REGISTERED, {"rpc": rp})

    def get(self, rp: str) -> Optional[Callable[..., Any]]:
        return self._handlers.get(rp)


class Emitter:
    """``on(type, handler)`` / ``off(type, handler)``; ``on(type)`` is a decorator."""

    def __init__(self) -> None:
        self._handlers: Dict[Any, List[Callable[..., Any]]] = {}

    def on(self, type: Any, handler: Optional[Callable[..., Any]] = None) -> Callable[..., Any]:
        if handler is None:
            return lambda fn: self.on(type, fn)
        if not callable(handler):
            raise TypeError("handler must be callable")
        self._handlers.setdefault(type, []).append(handler)
        return handler

    def off(self, type: Any, handler: Optional[Callable[..., Any]] = None) -> None:
        """Remove one handler, or all handlers of ``type``."""
        if handler is None:
            self._handlers.pop(type, None)
            return
        handlers = self._handlers.get(type, [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers:
            self._handlers.pop(type, None)

    def handlers(self, type: Any) -> List[Callable[..., Any]]:
        return list(self._handlers.get(type, ()))

    def has(self, type: Any) -> bool:
        return bool(self._handlers.get(type))


class When:
    """``when.joined(handler)`` binds a handler and returns it (decorator-friendly)."""

    def __init__(self) -> None:
        self.emitter = Emitter()
        for name in EVENTS:
            setattr(self, name, self._binder(name))

    def _binder(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def bind(handler: Callable[..., Any]) -> Callable[..., Any]:
            return self.emitter.on(name, handler)
        bind.__name__ = name
        bind.__doc__ = f"Bind a handler to the {name!r} event; returns the handler."
        return bind

    def off(self, name: str, handler: Optional[Callable[..., Any]] = None) -> None:
        self.emitter.off(name, handler)


_SIG_CACHE: Dict[Any, Optional[FrozenSet[str]]] = {}


def call_with_kwargs(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments it declares (all if it takes **kwargs)."""
    # False: not cached yet; None: fn takes every keyword
    accepted: Union[FrozenSet[str], None, Literal[False]] = _SIG_CACHE.get(fn, False)
    if accepted is False:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            accepted = None
        else:
            if any(p.kind == p.VAR_KEYWORD for p in params):
                accepted = None
            else:
                accepted = frozenset(p.name for p in params
                                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        try:
            _SIG_CACHE[fn] = accepted
        except TypeError:  # pragma: no cover - unhashable callables
            pass
    if accepted is None:
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in accepted})
