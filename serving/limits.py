"""Per-key request and token limits: a sliding one-minute window per key, in plain Python.

Semantics (README "Per-key limits"): a request is admitted when its key has had fewer than
`requests_per_minute` requests admitted, and fewer than `tokens_per_minute` tokens charged, in the
last 60 s. Its prompt + completion tokens are charged when it finishes (only then are they known),
so one admitted request can take a key past its token budget; the key then waits until enough of
the window has slid by. Denied requests are not counted (a client retrying in a loop recovers as
soon as the window allows). Each replica keeps its own windows: limits are per replica.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 60.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: str | None = None  # "requests" or "tokens" (OpenAI's error type) when denied
    retry_after_s: int = 0  # whole seconds until a retry can be admitted (>= 1 when denied)
    budget: int | None = None  # the limit that was hit, for the error message


@dataclass
class _Window:
    requests: deque = field(default_factory=deque)  # admission times
    tokens: deque = field(default_factory=deque)  # (charge time, tokens)
    token_sum: int = 0

    def slide(self, start: float) -> None:
        while self.requests and self.requests[0] <= start:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= start:
            self.token_sum -= self.tokens.popleft()[1]


class KeyLimiter:
    """`limits_for(key)` gives a key's (requests per minute, tokens per minute), None = unlimited.
    Thread safe (one lock; every operation is O(entries that leave the window))."""

    def __init__(self, limits_for: Callable[[str], tuple[int | None, int | None]],
                 window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.limits_for, self.window_s, self.clock = limits_for, window_s, clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def admit(self, key: str) -> Decision:
        """Admit (and count) one request of `key`, or say which limit stops it and for how long."""
        rpm, tpm = self.limits_for(key)
        if rpm is None and tpm is None:
            return Decision(True)
        with self._lock:
            now = self.clock()
            window = self._windows.setdefault(key, _Window())
            window.slide(now - self.window_s)
            denials = []
            if rpm is not None and len(window.requests) >= rpm:
                # the oldest counted request leaving the window frees a slot
                oldest = window.requests[len(window.requests) - rpm]
                denials.append(("requests", oldest + self.window_s - now, rpm))
            if tpm is not None and window.token_sum >= tpm:
                # the first time the tokens still in the window fall under the budget
                left = window.token_sum
                for charged_at, tokens in window.tokens:
                    left -= tokens
                    if left < tpm:
                        denials.append(("tokens", charged_at + self.window_s - now, tpm))
                        break
            if denials:
                limit, wait, budget = max(denials, key=lambda d: d[1])  # both must have cleared
                return Decision(False, limit, max(1, math.ceil(wait)), budget)
            if rpm is not None:
                window.requests.append(now)
            return Decision(True)

    def charge(self, key: str, tokens: int) -> None:
        """Count a finished request's tokens against its key's token budget."""
        if tokens <= 0 or self.limits_for(key)[1] is None:
            return
        with self._lock:
            now = self.clock()
            window = self._windows.setdefault(key, _Window())
            window.slide(now - self.window_s)
            window.tokens.append((now, tokens))
            window.token_sum += tokens
