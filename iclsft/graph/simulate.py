"""A sweep's work graph without any tokenizer or model, run by the real scheduler on a virtual clock.

`simulation_works(config, device, arms)` builds the works a sweep's arms have left as `iclsft.graph.run.GraphRun` does:
one training per distinct training (conditions whose batches hold the same exemplars share one), one
scoring per ICL chain (one task, seed and order, K ascending) and per trained checkpoint (all of its
conditions), one RSA pass per scoring unit of the 2D study (`rsa: true`), the implicit suite's circuit states; each
timed from the measured rates (costs.py). `simulate` hands
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
from typing import Any

from iclsft.engine.base import engine_class, resolve_engine
from iclsft.graph.costs import (
    RATES,
    condition_bytes,
    engine_start_seconds,
    full_checkpoint_bytes,
    lora_adapter_bytes,
    model_scale,
    model_shape,
    prefix_tokens,
    rsa_bytes,
    rsa_seconds,
    score_seconds,
    swap_seconds,
    train_seconds,
)
from iclsft.graph.resources import Resources, Slots, resolve
from iclsft.graph.schedule import Usage, schedule
from iclsft.graph.work import ROLES, Finished, Work, icl_chains, scoring_share, unit_label
from iclsft.rsa.run import rsa_is_current
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
    engine = engine or planned_engine(config, device)
    graph = _Graph(config, device, engine, engine_start_seconds(engine, device), engine_class(engine).can_load_weights)
    for model, planned in arms.items():
        for path, spec, ref in planned:
            graph.add_arm(model, RunDir(path), spec, model_shape(str(ref.path)))
        if config.implicit is not None and config.implicit.circuits and graph.implicit_left:
            graph.add_circuits(model)
    return graph.works


class _Graph:
    """The works of each arm in turn, as `iclsft.graph.run.GraphRun` builds them for a real sweep."""

    def __init__(self, config, device: str, engine: str, start: float, swaps: bool):
        self.config, self.device, self.engine, self.start, self.swaps = config, device, engine, start, swaps
        self.works: list[Work] = []
        self.implicit_left = False  # the implicit suite of the model being added has work left
        self.implicit_trainings: dict[tuple, str] = {}  # (method, task, seed) -> its training's work id

    def add_arm(self, model: str, run, spec, shape: dict) -> None:
        key, sft, study = f"{model}|{spec.arm}", spec.training, of_spec(spec)
        self.study = study.name
        conds = spec.conditions()
        todo = [c for c in conds if not run.is_done(c)]
        needs: dict[str, tuple] = {}  # condition id -> the training of its checkpoint
        planned = study.trainings(spec, todo) if sft is not None else []
        for i, (group, n) in enumerate(planned):
            tid = self._train(key, model, spec.arm, i, sft, n, len({c.checkpoint for c in group}),
                              shape)
            needs.update((c.id, (tid,)) for c in group)
            if study.circuits:  # the circuit states of each fine-tuned model wait for its training
                self.implicit_trainings.update(((c.method, c.task, c.seed), tid) for c in group)
        if study.circuits:
            self.implicit_left |= bool(todo)
        # scoring units as the real graph has them: an ICL chain (one task, seed and order, K ascending), or
        # every condition of one checkpoint (one training's checkpoint at one fraction)
        if sft is None:
            units = icl_chains(todo)
        else:
            by_ckpt: dict[tuple, list] = {}
            for c in todo:
                by_ckpt.setdefault((needs[c.id], c.checkpoint), []).append(c)
            units = list(by_ckpt.values())
        unit_of: dict[str, str] = {}
        for unit in units:
            uid = self._score(key, model, unit, sft, needs.get(unit[0].id, ()), shape)
            unit_of.update((c.id, uid) for c in unit)
        if self.config.rsa and study.rsa:
            self._rsa(key, model, run, conds, units, unit_of, needs, sft, shape)

    def add_circuits(self, model: str) -> None:
        """The implicit suite's circuit states (`iclsft.graph.run.GraphRun._add_circuits`): per task, the base
        model, ICL, and each fine-tuned model, on the first seed, after that model's training."""
        imp = self.config.implicit
        seed = min(self.config.seeds)
        hooks = ((f"hooks|{model}", RATES[self.device]["model_load"]),)
        methods = [m for m in imp.methods if m != "icl"] * ("ours" in imp.recipes)
        methods += ["full-original"] * ("original" in imp.recipes)
        for task in imp.tasks:
            for state in ("base", f"icl-K{imp.circuit_shots}", *methods):
                tid = self.implicit_trainings.get((state, task, seed))
                self.works.append(Work(f"{model}|circuits|{task}|{state}", "scorer", f"circuits {task} {state}",
                                       score_seconds(3 * imp.circuit_pairs, 0, self.device), affinity=model,
                                       needs=(tid,) if tid else (), arm=f"{model}|circuits",
                                       payload=Stand("circuits", model, state), setup=hooks))
        self.implicit_left = False

    def _train(self, key: str, model: str, arm: str, i: int, sft, steps: int, checkpoints: int, shape: dict) -> str:
        each = lora_adapter_bytes(shape, sft) if sft.method == "lora" else full_checkpoint_bytes(shape)
        work = Work(f"{key}|train|{i}", "trainer", f"{arm} training {i} ({steps} steps)",
                    train_seconds(steps, sft.method, self.device, model_scale(shape), self.study), arm=key,
                    payload=Stand("train", model, sft.method, steps=steps, checkpoints=checkpoints,
                                  bytes=checkpoints * each), holds=0 if sft.method == "lora" else checkpoints)
        self.works.append(work)
        return work.id

    def _score(self, key: str, model: str, unit: list, sft, needs: tuple, shape: dict) -> str:
        """One scoring work of `unit`'s conditions; returns its id. A full checkpoint is swapped into the
        scorer's engine (its read priced per work) or, on an engine that cannot swap, gets an engine of its
        own; vllm keeps LoRA arms on an engine of their own (ScorerActor: LoRA is enabled at start)."""
        method, first = (sft.method if sft else "icl"), unit[0]
        full, swap = sft is not None and method != "lora", 0.0
        if full and not self.swaps:
            setup = ((f"engine|{model}|{needs[0]}|{first.checkpoint}", self.start),)
        else:
            lora = "|lora" if method == "lora" and self.engine != "hf" else ""
            setup = ((f"engine|{model}{lora}", self.start),)
            swap = swap_seconds(full_checkpoint_bytes(shape), self.device) if full else 0.0
        work = Work(f"{key}|{first.id}", "scorer", unit_label(unit),
                    swap + sum(score_seconds(c.queries, prefix_tokens(c), self.device, model_scale(shape))
                               for c in unit),
                    needs=needs, arm=key, affinity=model, setup=setup,
                    payload=Stand("score", model, method, conditions=len(unit),
                                  queries=sum(c.queries for c in unit), bytes=sum(map(condition_bytes, unit))))
        self.works.append(work)
        return work.id

    def _rsa(self, key: str, model: str, run, conds, units: list, unit_of: dict, needs: dict, sft,
             shape: dict) -> None:
        """RSA in the scoring units (`GraphRun._rsa_work`): one work per unit left to run, after it (and its
        training), its checkpoint loaded once; a finished condition whose stored RSA is not current gets a
        work of its own."""
        stale = [[c] for c in conds if c.id not in unit_of
                 and not rsa_is_current(run.condition_dir(c), c.id, self.config.dtype, self.config.rsa_subset)]
        hooks = ((f"hooks|{model}", RATES[self.device]["model_load"] * model_scale(shape)["load"]),)
        # a full fine-tune is loaded once per unit (iclsft.rsa.run.Models.loaded); LoRA attaches to the hooks' base
        load = hooks[0][1] if sft is not None and sft.method != "lora" else 0.0
        for unit in [*units, *stale]:
            first = unit[0]
            after = (unit_of[first.id], *needs.get(first.id, ())) if first.id in unit_of else ()
            queries = sum(c.queries for c in unit)
            scale = model_scale(shape)
            self.works.append(Work(f"{key}|rsa|{first.id}", "scorer", f"RSA {first.label}",
                                   sum(rsa_seconds(c.queries, prefix_tokens(c), self.device, scale)
                                       for c in unit) + load, needs=after, arm=key, affinity=model, setup=hooks,
                                   payload=Stand("rsa", model, sft.method if sft else "icl", conditions=len(unit),
                                                 queries=queries, bytes=len(unit) * rsa_bytes(shape))))


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
