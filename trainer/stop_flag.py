"""Ctrl-C (SIGINT) and SIGTERM during a run.

Before the first training step nothing is worth saving, so a signal ends the
start-up at once (model loading can take minutes). From `arm()` on, the run
has outputs of its own: a signal then asks for a clean stop at the next step
boundary, where the state is saved.
"""

from __future__ import annotations

import signal


class StartupInterrupted(KeyboardInterrupt):
    """A signal ended the start-up: nothing was trained, nothing was written.

    A KeyboardInterrupt, so that code catching `Exception` lets it through."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopFlag:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._armed = False
        self._previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS}

    def _request(self, signum, frame):
        already = self.requested
        self.requested = True
        # Raise once only: a second Ctrl-C must not break the clean-up of the first.
        if not self._armed and not already:
            raise StartupInterrupted(signum)

    def arm(self) -> None:
        """From now on a signal stops the run at the next step boundary."""
        self._armed = True

    def restore(self) -> None:
        """Give the signals back: after a run, Ctrl-C must interrupt again."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopFlag:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
