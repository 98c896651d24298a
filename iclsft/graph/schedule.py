"""The scheduler: one loop that runs a work graph on any backend (Ray actors and tasks, or the
simulator's timed stand-ins), so `sweep --simulate` measures the scheduler that real sweeps use.

Each role has its slots (scorer actors; trainer slots that fit beside them). A free slot takes the
next ready work of its role — of the base model it ran last while that model has ready work (a
scorer keeps its engine: `Work.affinity`), else the best ready work: trainings longest first (their
tail sets the makespan), scorings of trained checkpoints before ICL scorings (a checkpoint's
conditions finish, and its files are freed, as soon as it exists; ICL fills the scorers while
trainings run). A work whose needed work failed
ends with that error, unrun. With `max_held`, a training that makes full checkpoints (`Work.holds`)
starts only while the checkpoints made and still needed by some work stay within that bound (one
training always may), so memory and disk for full fine-tunes stay bounded whatever the graph's size.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from iclsft.graph.work import ROLES, Finished, Work


class Backend(Protocol):
    def slots(self, role: str) -> list[str]: ...  # names of the slots of a role

    def start(self, work: Work, slot: str, inputs: list[Any]) -> None: ...  # inputs: handles of needed results

    def wait(self) -> list[Finished]: ...  # blocks until at least one started work ends

    def put(self, obj: Any) -> Any: ...  # a handle for data sent to several works (a reused checkpoint)

    def handle(self, work_id: str) -> Any: ...  # what a dependent is given for a finished work

    def forget(self, work_id: str) -> None: ...  # no dependent needs that result any more

    def now(self) -> float: ...

    def engine_starts(self) -> int: ...  # engines its scorers opened so far


class HeldResults:
    """What the real backends share: each finished work's result (or its handle) kept in `results` until no
    dependent needs it, and the wall clock."""

    results: dict[str, Any]

    def handle(self, work_id: str) -> Any:
        return self.results[work_id]

    def forget(self, work_id: str) -> None:
        self.results.pop(work_id, None)

    def now(self) -> float:
        return time.time()


class Usage:
    """Busy seconds per role and slot over the graph's makespan."""

    def __init__(self, slots: dict[str, list[str]], started: float):
        self.slots, self.started = slots, started
        self.busy: dict[str, dict[str, float]] = {r: dict.fromkeys(s, 0.0) for r, s in slots.items()}
        self.ended = started
        self.works: dict[str, int] = dict.fromkeys(slots, 0)

    def add(self, done: Finished) -> None:
        role = done.work.role
        self.busy[role][done.worker] = self.busy[role].get(done.worker, 0.0) + done.seconds
        self.works[role] += 1
        self.ended = max(self.ended, done.ended)

    @property
    def makespan(self) -> float:
        return self.ended - self.started

    def record(self) -> dict:
        """role -> works, busy seconds, slots, utilisation (busy / (slots x makespan))."""
        span = self.makespan
        return {role: {"works": self.works[role], "seconds": round(sum(b.values()), 1), "workers": len(b),
                       "utilisation": round(sum(b.values()) / (len(b) * span), 3) if span > 0 and b else 0.0}
                for role, b in self.busy.items() if b}

    def summary(self) -> str:
        return ", ".join(f"{role}s: {r['works']} works, busy {r['seconds']:.0f} s on {r['workers']} "
                         f"({100 * r['utilisation']:.0f}%)" for role, r in self.record().items())


def schedule(works: Iterable[Work], backend: Backend, on_done: Callable[[Finished], None],
             max_held: int | None = None) -> Usage:
    """Run every work on `backend` as its needs finish; `on_done` sees each as it ends (dependents of a
    failed work end with its error, unrun). `max_held`: full checkpoints held at once (module doc).
    Returns per-role usage."""
    if max_held is not None and max_held < 1:
        raise ValueError(f"max_held {max_held!r}: at least 1 full checkpoint must be allowed in flight")
    works = list(works)
    by_id = {w.id: w for w in works}
    if len(by_id) != len(works):
        raise ValueError("two works share an id")
    missing = {n for w in works for n in w.needs if n not in by_id}
    if missing:
        raise ValueError(f"works need unknown works: {', '.join(sorted(missing))}")
    waiting = {w.id: set(w.needs) for w in works}
    dependents: dict[str, list[str]] = {}
    for w in works:
        for n in w.needs:
            dependents.setdefault(n, []).append(w.id)
    slots = {role: backend.slots(role) for role in ROLES}
    for w in works:
        if not slots[w.role]:
            raise ValueError(f"no {w.role} slot to run {w.label}: give the sweep's resources at least one")
    free = {role: list(reversed(s)) for role, s in slots.items()}
    ready: dict[str, dict[str, list]] = {role: {} for role in ROLES}  # role -> affinity -> heap
    last: dict[str, str] = {}  # slot -> the affinity (base model) of the last work it ran
    order = itertools.count()
    usage = Usage({r: s for r, s in slots.items() if any(w.role == r for w in works)}, backend.now())
    remaining = {w.id: len(dependents.get(w.id, [])) for w in works}
    held = [0]  # full checkpoints made or being made, still needed
    gone: set[str] = set()

    def let_go(work_id: str) -> None:
        if work_id not in gone:
            gone.add(work_id)
            backend.forget(work_id)
            held[0] -= by_id[work_id].holds

    def release(w: Work) -> None:  # a result no dependent still needs is let go
        for n in w.needs:
            remaining[n] -= 1
            if remaining[n] == 0:
                let_go(n)

    def fits(w: Work) -> bool:
        return max_held is None or not w.holds or held[0] == 0 or held[0] + w.holds <= max_held

    def push(w: Work) -> None:
        # trainers: longest first; scorers: trained checkpoints (needs) before ICL, then in plan order
        key = -w.cost if w.role == "trainer" else (0 if w.needs else 1)
        heapq.heappush(ready[w.role].setdefault(w.affinity, []), (key, next(order), w))

    def pick(role: str, slot: str) -> Work | None:
        # the slot's own model while it has ready work (no engine swapped out), else the best ready work;
        # the best of those that fit the bound on held checkpoints (None: none fits now)
        heaps = ready[role]
        affinity = last.get(slot)
        if affinity not in heaps:
            affinity = min(heaps, key=lambda a: heaps[a][0][:2])
        skipped, w = [], None
        while heaps[affinity]:
            entry = heapq.heappop(heaps[affinity])
            if fits(entry[2]):
                w = entry[2]
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(heaps[affinity], entry)
        if not heaps[affinity]:
            del heaps[affinity]
        if w is not None:
            last[slot] = affinity
            held[0] += w.holds
        return w

    def end(done: Finished) -> None:
        on_done(done)
        for dep in dependents.get(done.work.id, []):
            if dep not in waiting:  # already ended: it also needed another work that failed
                continue
            waiting[dep].discard(done.work.id)
            if done.error is not None and dep in waiting:
                waiting.pop(dep)
                release(by_id[dep])
                now = backend.now()
                end(Finished(by_id[dep], "-", now, now, error=done.error))
            elif dep in waiting and not waiting[dep]:
                waiting.pop(dep)
                push(by_id[dep])

    for w in works:
        if not w.needs:
            waiting.pop(w.id)
            push(w)
    running = 0
    while running or any(ready.values()):
        for role in ROLES:
            while free[role] and ready[role]:
                slot = free[role].pop()
                w = pick(role, slot)
                if w is None:  # every ready work waits for held checkpoints to be let go
                    free[role].append(slot)
                    break
                backend.start(w, slot, [backend.handle(n) for n in w.needs])
                running += 1
        if not running:
            break
        for done in backend.wait():
            running -= 1
            free[done.work.role].append(done.worker)
            usage.add(done)
            end(done)
            release(done.work)
            if remaining[done.work.id] == 0:
                let_go(done.work.id)
    if waiting:  # cannot happen for a graph without cycles
        raise ValueError(f"{len(waiting)} works never became ready (a cycle in their needs)")
    return usage
