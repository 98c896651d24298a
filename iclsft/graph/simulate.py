"""A sweep's work graph without any tokenizer or model, run by the real scheduler on a virtual clock.

`simulation_works(config, device, arms)` builds the works a sweep's arms have left with the builder
`iclsft.graph.run.GraphRun` uses (`iclsft.graph.build`), from trainings planned without a tokenizer
(`Study.trainings`: conditions whose batches hold the same exemplars share one): one training each, one
scoring per ICL chain and per checkpoint, one RSA pass per scoring unit of the 2D study (`rsa: true`), the
implicit suite's circuit states; each timed from the measured rates (costs.py). `simulate` hands
them to `iclsft.graph.schedule.schedule`, the loop that real sweeps run on Ray, with a `VirtualBackend`
that ends each work after its estimated seconds. A scorer pays once for each engine it opens (base
model loaded, engine started) and once for the RSA hooks' model, on its first work that needs them.

Slots holding fractions of a GPU share it: the works running on one GPU each get an equal part of its
rate. The rates are measured on whole GPUs and a shared GPU is taken to be the bottleneck, so sharing is
never shown faster than it is (a model too small to fill a GPU gains more from sharing than this says).
"""

from __future__ import annotations

import heapq
import importlib.util
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iclsft.engine.base import engine_class, resolve_engine
from iclsft.graph.build import ArmWorks, Builder, Circuits, Part, Training, stale_rsa
from iclsft.graph.costs import (
    RATES,
    condition_bytes,
    engine_start_seconds,
    full_checkpoint_bytes,
    load_seconds,
    lora_adapter_bytes,
    model_scale,
    model_shape,
    rsa_bytes,
    swap_seconds,
)
from iclsft.graph.resources import Resources, Slots, resolve
from iclsft.graph.schedule import Usage, schedule
from iclsft.graph.work import ROLES, Finished, Work, scoring_share
from iclsft.implicit.circuits import CIRCUITS_DIR, read_index
from iclsft.store import RunDir
from iclsft.study import of_spec

GPU_NODE_CPUS = 8  # CPUs per GPU assumed when simulating GPUs without a CPU count


@dataclass(frozen=True)
class Stand:
    """What a simulated work stands for; the planner adds these up."""

    kind: str  # "train", "score", "rsa" or "circuits"
    model: str
    method: str  # icl, lora, full, ...
    conditions: int = 0  # a scoring's or RSA's conditions (an ICL chain, or every condition of one checkpoint)
    queries: int = 0
    steps: int = 0
    checkpoints: int = 0  # a training's saved checkpoints
    bytes: int = 0  # what it leaves on disk


class VirtualBackend:
    """The scheduler's backend on a virtual clock. A work needs `cost` seconds of its device, plus the
    seconds of each setup (engine, hooks) its slot has not done yet. A slot holding a whole GPU (or CPUs)
    gives it all of that device; slots holding fractions of a GPU (`gpus`: per role, below 1) are packed
    onto shared GPUs, scorers first, and the works running on one GPU share it equally (each at 1/n of
    the rate while n run: the rates are whole-GPU rates, and a shared GPU is taken to be the bottleneck).
    Works in `fail` end with an error. Deterministic: works ending at one time end in start order."""

    def __init__(self, slots: dict[str, int], *, gpus: dict[str, float] | None = None, fail: Iterable[str] = ()):
        self.slots_ = {role: [f"{role}-{i}" for i in range(slots.get(role, 0))] for role in ROLES}
        self.group: dict[str, int] = {}  # slot -> the shared GPU it sits on
        self.devices = 0  # GPUs (or, without GPUs, slots) the slots occupy
        room: list[float] = []  # left on each shared GPU
        for role in ROLES:
            f = (gpus or {}).get(role, 0.0)
            for slot in self.slots_[role]:
                if 0 < f < 1:
                    g = next((i for i, left in enumerate(room) if left >= f - 1e-9), None)
                    if g is None:
                        g, _ = len(room), room.append(1.0)
                    room[g] -= f
                    self.group[slot] = g
                else:
                    self.devices += int(f) if f >= 1 else 1
        self.devices += len(room)
        self.fail = set(fail)
        self.clock = 0.0
        self.seq = itertools.count()
        self.dedicated: list[tuple[float, int, Work, str, float]] = []  # (end, seq, work, slot, started)
        self.shared: dict[int, list] = {}  # seq -> [work, slot, started, seconds left at full rate, GPU]
        self.load: dict[int, int] = {}  # shared GPU -> works running on it
        self.opened: dict[str, set[str]] = {}  # slot -> setups done there
        self.setups: dict[str, int] = {}  # setup kind ("engine", "hooks") -> times done
        self.work = 0.0  # device-seconds of all works started (costs and setups)
        self.forgotten: list[str] = []

    def slots(self, role: str) -> list[str]:
        return self.slots_[role]

    def start(self, work: Work, slot: str, inputs: list[Any]) -> None:
        seconds = work.cost
        opened = self.opened.setdefault(slot, set())
        for key, extra in work.setup:
            if key not in opened:
                opened.add(key)
                seconds += extra
                kind = key.split("|", 1)[0]
                self.setups[kind] = self.setups.get(kind, 0) + 1
        self.work += seconds
        if slot in self.group:
            g = self.group[slot]
            self.shared[next(self.seq)] = [work, slot, self.clock, seconds, g]
            self.load[g] = self.load.get(g, 0) + 1
        else:
            heapq.heappush(self.dedicated, (self.clock + seconds, next(self.seq), work, slot, self.clock))

    def wait(self) -> list[Finished]:
        if not self.dedicated and not self.shared:
            raise RuntimeError("wait() with no work running")
        t = min([self.dedicated[0][0]] if self.dedicated else []
                + [self.clock + left * self.load[g] for _, _, _, left, g in self.shared.values()])
        dt = t - self.clock
        ended = []
        while self.dedicated and self.dedicated[0][0] <= t + 1e-9:
            end, seq, work, slot, started = heapq.heappop(self.dedicated)
            ended.append((seq, work, slot, started))
        for seq, entry in list(self.shared.items()):
            entry[3] -= dt / self.load[entry[4]]
            if entry[3] <= 1e-9:
                del self.shared[seq]
                ended.append((seq, *entry[:3]))
        for _, _, slot, _ in ended:
            if slot in self.group:
                self.load[self.group[slot]] -= 1
        self.clock = t
        out = []
        for _, work, slot, started in sorted(ended, key=lambda e: e[0]):
            error = f"{work.label}: failed (simulated)" if work.id in self.fail else None
            out.append(Finished(work, slot, started, t, result=None if error else work.id, error=error,
                                host="virtual"))
        return out

    def put(self, obj: Any) -> Any:
        return obj

    def handle(self, work_id: str) -> Any:
        return work_id

    def forget(self, work_id: str) -> None:
        self.forgotten.append(work_id)

    def now(self) -> float:
        return self.clock


def planned_engine(config, device: str) -> str:
    """The engine the sweep would score with on `device`: `auto` is vllm on GPUs where vLLM is installed."""
    if config.engine != "auto":
        return resolve_engine(config.engine)
    return "vllm" if device == "gpu" and importlib.util.find_spec("vllm") is not None else "hf"


def simulation_works(config, device: str, arms: dict[str, list], engine: str | None = None) -> list[Work]:
    """The works the sweep `config` has left (finished conditions, and their current RSA, are skipped), timed
    for `device` ("cpu" or "gpu") and scored with `engine` (default: `planned_engine`). `arms`: per model,
    its arms as (run directory, spec, model ref), the 2D arms first (`iclsft.sweep.plan.planned_arms`)."""
    if device not in RATES:
        raise ValueError(f"device {device!r} is not one of {', '.join(RATES)}")
    graph = _Virtual(config, device, engine or planned_engine(config, device))
    for model, planned in arms.items():
        suite: dict[Path, list] = {}  # run directories with circuit states -> their arms
        for path, spec, ref in planned:
            arm = graph.arm(model, RunDir(path), spec, ref)
            graph.add_arm(arm)
            if of_spec(spec).circuits:
                suite.setdefault(Path(path), []).append(arm)
        imp = config.implicit
        for path, suite_arms in suite.items() if imp is not None and imp.circuits else ():
            tasks = tuple(dict.fromkeys(t for arm in suite_arms for t in arm.spec.tasks))
            circuits = Circuits(model, RunDir(path), tasks, suite_arms[0].spec.seeds[0], imp.circuit_shots,
                                imp.circuit_pairs, model, model, suite_arms[0].scale)
            graph.add_circuits(circuits, suite_arms, read_index(path / CIRCUITS_DIR))
    return graph.works


CHECKPOINT_ENGINE = "engine|checkpoint|"  # the setup key of an engine opened for one full checkpoint


class _Virtual(Builder):
    """The builder's works with timed stand-ins (`Stand`) for payloads, and the setups of the engines and
    hook models the virtual backend pays for: a scorer's engine once, or on an engine that cannot swap
    weights one per full checkpoint; vllm keeps LoRA arms on an engine of their own (LoRA is enabled at its
    start); a full checkpoint swapped into a running engine is priced per work."""

    def __init__(self, config, device: str, engine: str):
        super().__init__(device)
        self.config, self.engine = config, engine
        self.start, self.swaps = engine_start_seconds(engine, device), engine_class(engine).can_load_weights
        self.shapes: dict[str, dict] = {}  # model -> its shape (costs.model_shape)

    def arm(self, model: str, run: RunDir, spec, ref) -> ArmWorks:
        """One arm, its trainings as `Study.trainings` plans them without a tokenizer (all to be made)."""
        study, sft = of_spec(spec), spec.training
        if model not in self.shapes:
            self.shapes[model] = model_shape(str(ref.path))
        todo = [c for c in spec.conditions() if not run.is_done(c)]
        trainings = None
        if sft is not None:
            trainings = []
            for i, (group, steps) in enumerate(study.trainings(spec, todo)):
                reads = tuple((c, f"{i}-{c.checkpoint}") for c in group)
                trainings.append(Training(str(i), sft.method, steps, reads, tuple(dict.fromkeys(k for _, k in reads))))
            trainings = tuple(trainings)
        rsa = bool(self.config.rsa and study.rsa)
        return ArmWorks(f"{model}|{spec.arm}", spec, study.name, todo, model, model_scale(self.shapes[model]),
                        sft.method if sft else "icl", trainings, rsa,
                        stale_rsa(run, spec, todo, self.config.dtype, self.config.rsa_subset) if rsa else {})

    def train_part(self, arm: ArmWorks, t: Training) -> Part:
        shape = self.shapes[arm.affinity]
        each = lora_adapter_bytes(shape, arm.spec.training) if t.method == "lora" else full_checkpoint_bytes(shape)
        return Part(Stand("train", arm.affinity, t.method, steps=t.steps, checkpoints=len(t.missing),
                          bytes=len(t.missing) * each))

    def score_part(self, arm: ArmWorks, conds: list, ckpt: str | None, trained: bool) -> Part:
        model, full, swap = arm.affinity, ckpt is not None and arm.method != "lora", 0.0
        if full and not self.swaps:
            setup = ((f"{CHECKPOINT_ENGINE}{arm.key}|{ckpt}", self.start),)
        else:
            lora = "|lora" if arm.method == "lora" and self.engine != "hf" else ""
            setup = ((f"engine|{model}{lora}", self.start),)
            swap = swap_seconds(full_checkpoint_bytes(self.shapes[model]), self.device) if full else 0.0
        return Part(Stand("score", model, arm.method, conditions=len(conds), queries=sum(c.queries for c in conds),
                          bytes=sum(map(condition_bytes, conds))), setup, swap)

    def rsa_part(self, arm: ArmWorks, conds: list, ckpt: str | None, trained: bool) -> Part:
        model = arm.affinity
        return Part(Stand("rsa", model, arm.method, conditions=len(conds), queries=sum(c.queries for c in conds),
                          bytes=len(conds) * rsa_bytes(self.shapes[model])), self._hooks(model, arm.scale))

    def circuit_part(self, circuits: Circuits, work_id: str, task: str, state: str, ckpt, trained: bool,
                     key: dict) -> Part:
        return Part(Stand("circuits", circuits.model, state), self._hooks(circuits.model, circuits.scale))

    def _hooks(self, model: str, scale: dict) -> tuple[tuple[str, float], ...]:
        """The RSA and circuits hooks' model (`scale`: its cost, costs.model_scale), loaded once per scorer."""
        return ((f"hooks|{model}", load_seconds(self.device, scale)),)


@dataclass
class Simulation:
    """One simulated run: the slots, the scheduler's usage, and what the virtual backend counted."""

    gpus: float
    cpus: float
    slots: Slots
    usage: Usage
    work: float  # device-seconds of every work (costs and setups)
    devices: int  # GPUs the slots occupy (without GPUs: the slots)
    setups: dict[str, int] = field(default_factory=dict)  # engine starts ("engine") and RSA hook loads ("hooks")
    # checkpoints_keep policy -> (peak, final) bytes of full checkpoints on disk (iclsft.sft.retention)
    full_disk: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def engine_starts(self) -> int:
        """The scorers' engines, and on engines that cannot swap weights those of full checkpoints."""
        return self.setups.get("engine", 0)

    @property
    def makespan(self) -> float:
        return self.usage.makespan

    @property
    def bound(self) -> float:
        """Total work / workers (devices): the makespan if every device were busy to the end."""
        return self.work / self.devices

    @property
    def utilisation(self) -> float:
        return self.bound / self.makespan if self.makespan > 0 else 0.0

    def record(self) -> dict:
        return {"gpus": self.gpus, "cpus": self.cpus, "scorers": self.slots.scorers, "trainers": self.slots.trainers,
                "devices": self.devices, "makespan": round(self.makespan, 1), "work": round(self.work, 1),
                "work_per_worker": round(self.bound, 1),
                "utilisation": round(self.utilisation, 3), "usage": self.usage.record(),
                "engine_starts": self.engine_starts, "setups": dict(self.setups)}


def simulate(config, works: list[Work], *, gpus: float = 0, cpus: float | None = None,
             resources: Resources | None = None) -> Simulation:
    """The sweep's `works` (`simulation_works`, timed for GPUs when `gpus` > 0, else CPUs) scheduled on
    `gpus` GPUs and `cpus` CPUs (default: GPU_NODE_CPUS per GPU, or this machine's CPUs) with `resources`
    (default: the config's; unset fields from the work's scoring share)."""
    if gpus < 0:
        raise ValueError(f"gpus {gpus!r} must be 0 (CPUs only) or more")
    if cpus is None:
        cpus = GPU_NODE_CPUS * gpus if gpus else float(os.cpu_count() or 1)
    slots = resolve(resources or config.resources, cpus, gpus, scoring_share(works))
    backend = VirtualBackend({"scorer": slots.scorers, "trainer": slots.trainers},
                             gpus={"scorer": slots.scorer_gpus, "trainer": slots.trainer_gpus})
    held = _FullCheckpoints(works)
    usage = schedule(works, backend, held.done, (resources or config.resources).checkpoints_in_flight)
    return Simulation(gpus, cpus, slots, usage, backend.work, backend.devices, dict(backend.setups), held.disk())


class _FullCheckpoints:
    """Bytes of full checkpoints on disk over the run under each `checkpoints_keep` policy (iclsft.sft.retention)
    when a deleted one goes as soon as every work that needs it (its scorings, RSA, circuits) has ended:
    `peak` and `final` per policy. A training's checkpoints end together (their works are the training's);
    `final` keeps one of each training's `checkpoints`."""

    def __init__(self, works: list[Work]):
        trainings = [w for w in works if w.role == "trainer" and getattr(w.payload, "method", "lora") != "lora"]
        self.bytes = {w.id: w.payload.bytes for w in trainings}
        self.last = {w.id: w.payload.bytes // max(1, getattr(w.payload, "checkpoints", 1)) for w in trainings}
        self.users = {tid: 0 for tid in self.bytes}
        for w in works:
            for n in w.needs:
                if n in self.users:
                    self.users[n] += 1
        self.now = {"none": 0, "final": 0}
        self.peak = dict(self.now)
        self.trained: set[str] = set()

    def done(self, done: Finished) -> None:
        if done.work.id in self.bytes and done.error is None:
            self.trained.add(done.work.id)
            for policy in self.now:
                self.now[policy] += self.bytes[done.work.id]
                self.peak[policy] = max(self.peak[policy], self.now[policy])
        for n in done.work.needs:
            if n in self.users:
                self.users[n] -= 1
                if self.users[n] == 0 and n in self.trained:
                    self.now["none"] -= self.bytes[n]
                    self.now["final"] -= self.bytes[n] - self.last[n]

    def disk(self) -> dict[str, tuple[int, int]]:
        """Policy -> (peak, final) bytes of full checkpoints."""
        total = sum(self.bytes[t] for t in self.trained)
        return {"all": (total, total), "final": (self.peak["final"], sum(self.last[t] for t in self.trained)),
                "none": (self.peak["none"], 0)}
