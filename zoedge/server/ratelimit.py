"""Per-device limit on patch uploads, shared by every worker and host: the hits live in the database.

A sliding-window counter: hits are counted per fixed window (table rate_windows, one row per device and
window), and a call is allowed while this window's hits plus the previous window's, weighted by the share of
it still inside the sliding window, stay within the limit. Counting is one atomic statement,
INSERT ... ON CONFLICT DO UPDATE SET hits = hits + 1 WHERE hits + 1 <= room RETURNING hits (SQLite >= 3.35 and
PostgreSQL): concurrent calls on any worker never admit more than `room`. Refused calls are not counted, so
a device that retries too early is not locked out for longer. Windows are aligned on the hosts' Unix clocks
(keep them NTP-synced)."""

from __future__ import annotations

import math
import time
from typing import Callable

from sqlalchemy import Engine, delete, select

from zoedge.server.db import dialect_insert
from zoedge.server.models import RateWindow


class RateLimiter:
    def __init__(self, engine: Engine, per_minute: int, window: float = 60.0,
                 clock: Callable[[], float] = time.time):
        self.engine = engine
        self.per_minute = per_minute
        self.window = window
        self.clock = clock
        self.insert = dialect_insert(engine)

    def _hits(self, key: str, window: int) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(select(RateWindow.hits).where(RateWindow.key == key,
                                                             RateWindow.window == window)) or 0

    def retry_after(self, key: str) -> float:
        """0 if the call is allowed (and counted), else the seconds to wait."""
        limit = self.per_minute
        if limit <= 0:
            return 0.0
        now = self.clock()
        window = math.floor(now / self.window)
        inside = 1.0 - (now / self.window - window)  # share of the previous window still in the sliding one
        prev = self._hits(key, window - 1)  # closed: no more hits arrive there
        room = math.floor(limit - prev * inside + 1e-9)  # hits this window may hold now
        hits = None
        if room >= 1:
            ins = self.insert(RateWindow).values(key=key, window=window, hits=1)
            stmt = ins.on_conflict_do_update(index_elements=[RateWindow.key, RateWindow.window],
                                             set_={"hits": RateWindow.hits + 1},
                                             where=RateWindow.hits + 1 <= room).returning(RateWindow.hits)
            with self.engine.begin() as conn:
                hits = conn.scalar(stmt)
                if hits == 1:  # this device's first call of the window: its older windows are of no use now
                    conn.execute(delete(RateWindow).where(RateWindow.key == key, RateWindow.window < window - 1))
        if hits is not None:
            return 0.0
        return max(0.001, self._wait(self._hits(key, window), prev, inside))

    def _wait(self, cur: int, prev: int, inside: float) -> float:
        """Seconds until cur + 1 + prev * (share still inside) <= limit, the weights decaying with time."""
        limit, w = self.per_minute, self.window
        if cur + 1 <= limit and prev > 0:  # later in this window, as the previous one slides out
            return w * (inside - (limit - cur - 1) / prev)
        # next window: this one becomes the previous, weighted by 1 - elapsed share
        return w * inside + w * max(0.0, 1.0 - (limit - 1) / max(cur, 1))
