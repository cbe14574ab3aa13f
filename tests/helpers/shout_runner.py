"""The `shout` family's runner (tests/helpers/shout.py): a threshold read from its tiny checkpoint, an extra task through the typed hook."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from workers.runners.base import ExtraTask, Item, Produced, Runner, TaskContext

TASK_PING = "trifecta.shout.ping"


def write_tiny(out: str) -> str:
    """`trifecta models tiny shout DIR`: the family's whole checkpoint is one threshold."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "config.json").write_text(json.dumps({"threshold": 100}))
    return out


class ShoutRunner(Runner):
    family = "shout"

    def load(self) -> None:
        cfg = Path(self.settings.model_dir) / self.model / "config.json"
        self.threshold = int(json.loads(cfg.read_text())["threshold"])
        self.source, self.trained = str(cfg), False

    def prepare(self, item: Item) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(item.data)).convert("L"))

    def predict(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        return [g > self.threshold for g in batch]

    def finish(self, item: Item, prepared: Any, pred: np.ndarray) -> Produced:
        return Produced(masks={"mask": pred}, meta={"threshold": self.threshold})

    def extra_tasks(self, ctx: TaskContext) -> list[ExtraTask]:
        # what the hook may use of its worker, shown to the test through the registration hash
        ctx.reg_fields["shout"] = lambda: f"{ctx.model}@{ctx.worker_id}:{self.threshold}"

        def ping(reply: str) -> None:
            ctx.r.publish(reply, ctx.worker_id)

        return [ExtraTask(TASK_PING, ping, acks_late=False)]
