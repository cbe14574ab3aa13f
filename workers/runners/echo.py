"""`echo`: a no-op model for measuring the pipeline and for tests.

It never decodes the input. `params.sleep_ms` (at most 60 000) holds the batch that
long, which is how tests stall a worker to fill the queue or to outlive a deadline.
(The dead-letter tests' poison, a `params.crash` that kills the worker, is injected by
`tests/helpers/faults`, never carried here.)
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from tasks.errors import Unprocessable
from workers.runners.base import ExtraTask, Item, Produced, Runner, TaskContext


class EchoRunner(Runner):
    family = "echo"

    def load(self) -> None:
        self.source = "builtin"

    def prepare(self, item: Item) -> dict[str, Any]:
        p = item.req.params
        sleep_ms = p.get("sleep_ms", 0)
        if not isinstance(sleep_ms, (int, float)) or not 0 <= sleep_ms <= 60_000:
            raise Unprocessable("sleep_ms must be a number between 0 and 60000")
        return {"n": len(item.data), "sleep_ms": float(sleep_ms), "digest": hashlib.blake2b(item.data, digest_size=8).hexdigest()}

    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        longest = max(b["sleep_ms"] for b in batch)
        if longest:
            time.sleep(longest / 1000)
        return batch

    def finish(self, item: Item, prepared: dict[str, Any], pred: dict[str, Any]) -> Produced:
        return Produced(meta={"bytes": pred["n"], "digest": pred["digest"]})

    def extra_tasks(self, ctx: TaskContext) -> list[ExtraTask]:
        """Decode-only video sessions (no model) when VIDEO_SESSION_MODEL=echo: the session machinery without SAM3."""
        if self.settings.video_session_model != self.model:
            return []
        from workers.runners.sam3_video import session_tasks

        return session_tasks(ctx, None)
