"""The scheduler's backend in this process: one scorer slot (the `ScorerActor` the Ray backend runs as an
actor, here a plain object) and one trainer slot, each work run to its end in turn, in the order the
scheduler starts them. Driver and worker share the disk: a training saves its checkpoints straight into
the run directory and a scorer reads them there (`GraphRun(shared_disk=True)`), nothing is sent as data.
A training sharded over Ray Train workers (`SftSpec.workers` > 1) runs on a Ray started here for it."""

from __future__ import annotations

import contextlib
import socket
import time
import traceback
from typing import Any

from iclsft.graph.ray_backend import ray_session
from iclsft.graph.remote import ScorerActor
from iclsft.graph.schedule import HeldResults
from iclsft.graph.work import Finished, Work
from iclsft.sft.distributed import train_distributed
from iclsft.sft.train import in_training_order, train
from iclsft.spec import ExecutorSpec

# what a work may fail with and still let the graph go on (anything else, e.g. KeyboardInterrupt, stops it)
WORK_ERRORS = (RuntimeError, ValueError, MemoryError, OSError, ImportError)


class LocalBackend(HeldResults):
    def __init__(self, executor: ExecutorSpec | None = None, *, progress: bool = True):
        self.executor = executor or ExecutorSpec(name="local")
        self.scorer = ScorerActor(threads=None, progress=progress)
        self.queue: list[tuple[Work, str, list]] = []
        self.results: dict[str, Any] = {}
        self.ray = contextlib.ExitStack()  # a Ray for sharded trainings, started on the first
        self.ray_started = False

    def slots(self, role: str) -> list[str]:
        return [f"{role}-0"]

    def start(self, work: Work, slot: str, inputs: list[Any]) -> None:
        self.queue.append((work, slot, inputs))

    def wait(self) -> list[Finished]:
        """Run the work started first to its end."""
        work, slot, inputs = self.queue.pop(0)
        started = time.time()
        try:
            value = self._train(work.payload[0]) if work.role == "trainer" else self._score(work, inputs)
        except WORK_ERRORS:
            return [Finished(work, slot, started, time.time(), error=traceback.format_exc())]
        self.results[work.id] = value
        return [Finished(work, slot, started, time.time(), result=value, host=socket.gethostname())]

    def _train(self, job) -> dict:
        if job.sft.workers > 1:
            if not self.ray_started:
                self.ray.enter_context(ray_session(self.executor))
                self.ray_started = True
            return train_distributed(in_training_order(job), self.executor)
        return train(job)

    def _score(self, work: Work, inputs: list) -> Any:
        task = work.payload() if callable(work.payload) else work.payload
        *value, _host, _gpus = getattr(self.scorer, task.method)(task, *inputs)
        return value[0] if len(value) == 1 else tuple(value)

    def put(self, obj: Any) -> Any:
        return obj

    def engine_starts(self) -> int:
        return self.scorer.starts()

    def close(self) -> None:
        try:
            self.scorer.close()
        finally:
            self.ray.close()
