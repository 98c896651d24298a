"""The scheduler's backend on Ray: scorer actors (one engine each, restarted and their work retried
when one dies) and trainings as tasks (retried by Ray), on a local Ray or a cluster (`ray_address`); and
`ray_session`, the Ray of sharded trainings in this process. The one place that starts Ray and makes Ray
tasks and actors of our work.
Results stay in Ray's object store: a training's checkpoint files go to the scorers that need them
without passing through the driver's disk."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from typing import Any

from iclsft.graph.remote import ScorerActor, train_task
from iclsft.graph.resources import Resources, Slots, resolve
from iclsft.graph.schedule import HeldResults
from iclsft.graph.work import Finished, Work
from iclsft.spec import ExecutorSpec

logger = logging.getLogger(__name__)

NODE_PATHS = ("ICLSFT_HOME", "ICLSFT_ADAPTER_ROOT")  # a node's own directories: never sent to a cluster's workers


def start_ray(executor: ExecutorSpec, cpus: int | None = None, gpus: float | None = None) -> bool:
    """Join `executor.ray_address`, or start a local Ray (of `cpus` CPUs, default all, and `gpus`
    declared GPUs); False when Ray was already running here. The workers get this process's ICLSFT_*
    variables (fault injection among them), except, on a cluster, the paths of this machine: each node
    keeps its own cache (ICLSFT_HOME), where it finds the base model by fingerprint."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: v for k, v in os.environ.items()
           if k.startswith("ICLSFT_") and not (executor.ray_address and k in NODE_PATHS)}
    options = dict(runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.ERROR)
    if executor.ray_address:
        check_reachable(executor.ray_address)
        ray.init(address=executor.ray_address, **options)  # Ray's own start-up lines are not ours to print
    else:
        ray.init(num_cpus=cpus or os.cpu_count() or 1, num_gpus=gpus, include_dashboard=False, **options)
    return True


@contextlib.contextmanager
def ray_session(executor: ExecutorSpec, cpus: int | None = None):
    """Ray for the block (`start_ray`'s), shut down after it when it was started here."""
    import ray

    started_here = start_ray(executor, cpus=cpus)
    if started_here:
        logger.info("ray: %g CPUs, %g GPUs", ray.cluster_resources().get("CPU", 0),
                    ray.cluster_resources().get("GPU", 0))
    try:
        yield started_here
    finally:
        if started_here:
            ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One clear ConnectionError when nothing answers at a host:port Ray address (Ray itself waits a minute
    or more, then fails with its own trace); "auto" and ray:// addresses are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if address in ("auto", "local") or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at ray_address {address!r} ({e.strerror or e}); start one "
                              "with `ray start --head` or give the address `ray status` prints") from None


class RayBackend(HeldResults):
    def __init__(self, resources: Resources, executor: ExecutorSpec, *, progress: bool = False,
                 scoring_share: float | None = None):
        """`scoring_share`: the scorers' part of the work's seconds (the planner's), for the default split."""
        import ray

        total = ray.cluster_resources()
        self.slots_ = resolve(resources, total.get("CPU", 0), total.get("GPU", 0), scoring_share)
        s: Slots = self.slots_
        retries = executor.max_retries
        actor = ray.remote(ScorerActor).options(num_cpus=s.scorer_cpus, num_gpus=s.scorer_gpus,
                                                max_restarts=retries, max_task_retries=retries)
        self.new_actor = lambda: actor.remote(threads=s.scorer_cpus, progress=progress, gpu_share=s.scorer_gpus,
                                              max_models=resources.models_per_scorer)
        self.actors = [self.new_actor() for _ in range(s.scorers)]
        self.train = ray.remote(train_task).options(num_cpus=s.trainer_cpus, num_gpus=s.trainer_gpus,
                                                    max_retries=retries, retry_exceptions=True)
        self.running: dict[Any, tuple[Work, str, float]] = {}
        self.results: dict[str, Any] = {}
        self.placement: dict[str, dict] = {}  # slot -> where its works ran (hosts, GPU ids)

    def slots(self, role: str) -> list[str]:
        n = self.slots_.scorers if role == "scorer" else self.slots_.trainers
        return [f"{role}-{i}" for i in range(n)]

    def start(self, work: Work, slot: str, inputs: list[Any]) -> None:
        payload = work.payload() if callable(work.payload) else work.payload
        if work.role == "trainer":
            ref = self.train.remote(*payload, threads=self.slots_.trainer_cpus)
        else:
            actor = self.actors[int(slot.rsplit("-", 1)[1])]
            ref = getattr(actor, payload.method).remote(payload, *inputs)  # score, rsa or circuits
        self.running[ref] = (work, slot, time.time())

    def wait(self) -> list[Finished]:
        import ray

        ready, _ = ray.wait(list(self.running), num_returns=1)
        ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)  # all that are done
        out = []
        for ref in ready:
            work, slot, started = self.running.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as e:  # after Ray's bounded retries
                out.append(Finished(work, slot, started, time.time(), error="".join(traceback.format_exception(e))))
                if work.role == "scorer" and isinstance(e, ray.exceptions.ActorDiedError):
                    self._replace(slot)
                continue
            self.results[work.id] = ref
            if work.role == "trainer":
                host, gpus = value.get("worker", "?"), value.get("gpus", [])
            else:
                *value, host, gpus = value
                value = value[0] if len(value) == 1 else tuple(value)
            where = self.placement.setdefault(slot, {"hosts": [], "gpus": []})
            for key, items in (("hosts", [host]), ("gpus", gpus)):
                where[key].extend(i for i in items if i not in where[key])
            out.append(Finished(work, slot, started, time.time(), result=value, host=host))
        return out

    def _replace(self, slot: str) -> None:
        """A scorer dead for good (its restarts spent) gets a successor: else every later work given to its
        slot would fail at once, and a slot that fails fast takes ever more of the remaining works."""
        import ray

        i = int(slot.rsplit("-", 1)[1])
        ray.kill(self.actors[i])
        self.actors[i] = self.new_actor()
        logger.warning("%s died and has no restarts left: a new scorer takes its slot", slot)

    def put(self, obj: Any) -> Any:
        import ray

        return ray.put(obj)

    def engine_starts(self) -> int:
        """Engines opened by the scorers alive now (a dead actor's count is gone with it)."""
        import ray

        starts = 0
        for a in self.actors:
            try:
                starts += ray.get(a.starts.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
        return starts

    def close(self) -> None:
        """Stop what still runs (an interrupted graph), close every scorer (its engines and scratch
        directory; at most a minute, all at once) and end the actors: nothing stays on a cluster."""
        import ray

        for ref, (work, _, _) in self.running.items():
            try:  # a task is stopped by killing its worker; Ray refuses that for an actor's task (killed below)
                ray.cancel(ref, force=work.role == "trainer")
            except Exception:  # already finished, or its worker gone
                pass
        if self.actors:
            ray.wait([a.close.remote() for a in self.actors], num_returns=len(self.actors), timeout=60)
        for a in self.actors:
            ray.kill(a)  # a dead actor has nothing left to end
