"""Write-time failures for tests: ``os`` as memprof.files sees it, failing on one call."""

from __future__ import annotations

import os


class FailingOs:
    """``os`` as memprof.files sees it: once ``armed``, the ``nth`` call of ``name`` fails with ``code``
    (``fired`` says whether it has)."""

    def __init__(self, name: str, nth: int, code: int) -> None:
        self.name, self.nth, self.code, self.calls, self.armed, self.fired = name, nth, code, 0, False, False

    def __getattr__(self, attr: str):
        real = getattr(os, attr)
        if attr != self.name or not self.armed:
            return real

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.nth:
                self.fired = True
                raise OSError(self.code, os.strerror(self.code))
            return real(*args, **kwargs)

        return call
