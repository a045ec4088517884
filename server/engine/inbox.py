"""The inbox: the typed messages the asyncio side posts to the engine thread.

It knows the four things a caller can ask of the engine (admit a request, abort one, run a
small function between steps, stop) and the futures that carry answers back. It does not know
the queue they travel in, or what the engine does with them: `Engine._handle` in
`server.engine.engine` reads them on the engine thread.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from moeserve.server.engine.output import RequestOutput

T = TypeVar("T")


@dataclass
class Admit:
    """Admit a request; ``admitted`` carries the refusal, if any, back to ``submit``."""

    client: RequestOutput
    admitted: concurrent.futures.Future[None]


@dataclass
class Abort:
    """Cancel a request (unknown or finished ones are ignored)."""

    request_id: str


@dataclass
class Call(Generic[T]):
    """A function to run on the engine thread, with the future that carries its result."""

    fn: Callable[[], T]
    done: concurrent.futures.Future[T]

    def run(self) -> None:
        """Run it; whatever it raises goes to the caller, never to the engine."""
        if not self.done.set_running_or_notify_cancel():
            return  # the caller went away (a cancelled future refuses any result)
        try:
            self.done.set_result(self.fn())
        except Exception as e:
            self.done.set_exception(e)


@dataclass
class Stop:
    """Leave the loop after the current step."""


Message = Admit | Abort | Call[Any] | Stop
