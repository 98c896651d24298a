"""A sweep's arms as one work graph: every arm of every model opened at once, their trainings and
scorings handed to the scheduler, each outcome written by this process (the driver) as it arrives.

Trainings start first, longest first; ICL conditions are scored while they run; each checkpoint's
conditions are scored as soon as it exists, by whichever scorer is free. Only the driver touches the
run directories: a training's checkpoint files arrive as data and are written here, and a reused
checkpoint is read here and sent (once, through the backend's object store) to the scorers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iclsft.arms import make_arm
from iclsft.arms.runner import ArmRun
from iclsft.arms.trainings import training_note
from iclsft.artifacts import atomic_write_json
from iclsft.errors import ConditionsFailed
from iclsft.graph.build import ArmWorks, Builder, Circuits, Part, Training, stale_rsa, train_id
from iclsft.graph.costs import model_scale, model_shape
from iclsft.graph.local_backend import LocalBackend
from iclsft.graph.ray_backend import RayBackend, start_ray
from iclsft.graph.remote import CircuitTask, RsaTask, ScoreTask, read_tree, write_tree
from iclsft.graph.resources import Resources
from iclsft.graph.schedule import Backend, Usage, schedule
from iclsft.graph.work import Finished, Work, scoring_share, unit_label
from iclsft.implicit.circuits import CIRCUITS_DIR, read_index, state_key, store_state
from iclsft.rsa import rsa_is_current
from iclsft.rsa.run import RSA_JSON, write_rsa, write_rsa_error
from iclsft.sft.adapters import ADAPTERS_DIR, is_finished, read_marker
from iclsft.sft.retention import check_needed, deletable, delete_checkpoint, retain
from iclsft.sft.train import total_steps
from iclsft.store import RunDir
from iclsft.study import of_spec

logger = logging.getLogger(__name__)


def run_graph(arms: Sequence[tuple[Path, Any, Any]], executor, resources=None, record: Path | None = None, *,
              local: bool = False, progress: bool = True, **options) -> tuple[dict[Path, Any], list[str]]:
    """Run (or resume) `arms` (run directory, spec, model ref) as one work graph: on Ray (started here, or
    joined at `executor.ray_address`), or with `local` in this process (`LocalBackend`: one work at a time,
    `progress` bars on); `record`: where to write the graph's resources, usage, engine starts and placement
    (JSON); `options`: GraphRun's. Returns each run directory's metrics table and the failures (one line per
    arm); nothing is started when nothing is left to run."""
    import ray

    graph = GraphRun(arms, "gpu" if _has_gpu(executor) else "cpu", shared_disk=local, **options)
    if not graph.works:  # everything finished: no engine to open, no Ray to start
        graph.run(None)
        return graph.tables, graph.failures
    trainings = sum(w.role == "trainer" for w in graph.works)
    if local:
        backend = LocalBackend(executor, progress=progress)
        try:
            usage = graph.run(backend)
            starts = backend.engine_starts()
        finally:
            backend.close()
        if record is not None:
            atomic_write_json(record, {"backend": "local", "makespan": round(usage.makespan, 1),
                                       "usage": usage.record(), "engine_starts": starts})
        return graph.tables, graph.failures
    started_here = start_ray(executor)
    if started_here:
        total = ray.cluster_resources()
        logger.info("ray: %g CPUs, %g GPUs", total.get("CPU", 0), total.get("GPU", 0))
    try:
        backend = RayBackend(resources or Resources(), executor, scoring_share=scoring_share(graph.works))
        logger.info("== work graph: %d arms, %d trainings and %d scorings on %s", len(arms), trainings,
                    len(graph.works) - trainings, backend.slots_.describe())
        try:
            usage = graph.run(backend, (resources or Resources()).checkpoints_in_flight)
            starts = backend.engine_starts()
        finally:
            backend.close()
    finally:
        if started_here:
            ray.shutdown()
    logger.info("== work graph done in %.0f s: %s; %d engine starts", usage.makespan, usage.summary(), starts)
    if record is not None:
        atomic_write_json(record, {
            "resources": backend.slots_.model_dump(), "makespan": round(usage.makespan, 1), "usage": usage.record(),
            "engine_starts": starts, "placement": backend.placement})
    return graph.tables, graph.failures


def _has_gpu(executor) -> bool:
    import torch

    return torch.cuda.is_available() or bool(executor.ray_address)  # a cluster is taken for GPUs


@dataclasses.dataclass
class _Arm:
    key: str
    state: ArmRun
    left: int = 0  # works not yet ended
    shared: dict = dataclasses.field(default_factory=dict)
    table: Any = None
    rsa_failed: list = dataclasses.field(default_factory=list)
    works: ArmWorks | None = None  # what the builder took


class GraphRun(Builder):
    """The driver's side of one graph: opens the arms, builds their works (the builder's parts: the tasks
    the workers run), writes what comes back."""

    def __init__(self, arms: Sequence[tuple[Path, Any, Any]], device: str = "cpu", *,
                 rsa: tuple[str, str] | None = None, circuits: tuple[int, int] | None = None,
                 shared_disk: bool = False):
        """Open every arm (run directories locked until `run` ends) and build its works; `device`: the
        rates the works' costs (their order) come from. `rsa`: (dtype, matrix subset) to compute RSA for
        every 2D condition on the scorers, after its scoring; `circuits`: (pairs, shots) to compute the
        implicit suite's circuit states on the scorers (the driver's `compute_circuits` then only
        tabulates the shift). A full fine-tune's checkpoint that its arm's `checkpoints_keep` deletes
        (iclsft.sft.retention) is deleted as soon as every work that reads it (its scorings, RSA and
        circuit states) has succeeded and been written (the marker stays, with the files' checksums).
        `shared_disk`: the backend's workers read and write the run directories (`LocalBackend`): a training
        saves into them, a scorer reads checkpoints there, and each condition is a work of its own, written
        as soon as it is scored (a chain's or a checkpoint's conditions still run in turn on one engine)."""
        super().__init__(device, split=shared_disk)
        self.backend: Backend | None = None
        self.shared_disk = shared_disk
        self.rsa, self.circuits = rsa, circuits
        self.indexes: dict[Path, dict] = {}  # implicit run dir -> its circuits.json, as written so far
        self.circuit_runs: dict[str, Path] = {}  # circuit state work id -> its run directory
        self.users: dict[str, list] = {}  # deletable checkpoint dir -> [works still using it, failed, policy]
        self.fractions: dict[str, float] = {}  # checkpoint dir -> its fraction of training (jobs of this graph)
        self.runs: dict[Path, RunDir] = {}
        self.arms: dict[str, _Arm] = {}
        self.scales: dict[Path, dict] = {}  # model dir -> its cost against the reference model
        self.trained: dict[str, dict] = {}  # training work id -> what its conditions' records say of it
        self.dirs: dict[str, dict[str, str]] = {}  # training work id -> checkpoint name -> driver's directory
        self.puts: dict[str, list] = {}  # reused checkpoint dir -> [handle, conditions left]
        self.failures: list[str] = []
        self.tables: dict[Path, Any] = {}
        try:
            for path, spec, ref in arms:
                arm = make_arm(spec, ref, progress=False)  # inputs checked first; its scorer is never opened here
                run = self.runs.get(Path(path))
                if run is None:
                    run = self.runs[Path(path)] = RunDir(path)
                run.open(arm.spec)  # each arm's checked spec frozen (or checked) before anything is written
                run.acquire_lock()  # once per run directory: a held lock is kept
                a = _Arm(f"{Path(path)}|{spec.arm}", ArmRun(arm, run))
                self.arms[a.key] = a
                a.works = self._arm_works(a, spec, ref)
                self.add_arm(a.works)
            for work in self.works:
                if work.arm in self.arms:
                    self.arms[work.arm].left += 1
            if circuits is not None:
                for path in dict.fromkeys(Path(p) for p, spec, _ in arms if of_spec(spec).circuits):
                    run = self.runs[path]
                    self._add_circuits(path, [a for a in self.arms.values() if a.state.run is run])
        except BaseException:
            self.close()
            raise

    def _arm_works(self, a: _Arm, spec, ref) -> ArmWorks:
        """The arm as the builder takes it: its trainings from its planned jobs (those whose checkpoints are
        all finished are read as they are)."""
        arm, study = a.state.arm, of_spec(spec)
        rsa = self.rsa is not None and study.rsa  # the 2D study's arms
        trainings = None
        if arm.trains:
            plan = arm.plan
            a.shared = plan.shared
            trainings = []
            for job in plan.jobs:
                self.fractions.update((d, f) for f, d in job.checkpoints)
                trainings.append(Training(job.key, job.sft.method, total_steps(len(job.examples), job.sft),
                                          tuple(plan.checkpoints[c] for c in job.meta["conditions"]),
                                          tuple(d for _, d in job.checkpoints if not is_finished(Path(d))), job))
            trainings = tuple(trainings)
        if ref.path not in self.scales:
            self.scales[ref.path] = model_scale(model_shape(str(ref.path)))
        return ArmWorks(a.key, spec, study.name, a.state.todo, ref.fingerprint, self.scales[ref.path],
                        spec.training.method if arm.trains else "icl", trainings, rsa,
                        stale_rsa(a.state.run, spec, a.state.todo, *self.rsa) if rsa else {})

    def train_part(self, arm: ArmWorks, t: Training) -> Part:
        ref = self.arms[arm.key].state.arm.ref
        missing = [(f, d) for f, d in t.job.checkpoints if d in t.missing]
        self.dirs[train_id(arm, t)] = {Path(d).name: d for _, d in missing}
        return Part((dataclasses.replace(t.job, checkpoints=missing), ref.name, ref.fingerprint))

    def score_part(self, arm: ArmWorks, conds: list, ckpt: str | None, trained: bool) -> Part:
        a = self.arms[arm.key]
        ref = a.state.arm.ref
        base = dict(arm=a.key, spec=arm.spec, model=ref.name, fingerprint=ref.fingerprint)
        if ckpt is None:  # ICL: each chain on the base model, K ascending
            return Part(ScoreTask(conds=tuple(conds), **base))
        records = tuple({"trained_now": trained} | ({"shared_with": a.shared[c.id]} if c.id in a.shared else {})
                        for c in conds)
        self._user(a, ckpt)
        return Part(self._source(ckpt, ScoreTask(conds=tuple(conds), records=records, checkpoint=Path(ckpt).name,
                                                 **base), trained))

    def rsa_part(self, arm: ArmWorks, conds: list, ckpt: str | None, trained: bool) -> Part:
        """RSA of a unit's conditions on a scorer (their checkpoint loaded once)."""
        a = self.arms[arm.key]
        ref = a.state.arm.ref
        dtype, subset = self.rsa
        task = RsaTask(conds=tuple(conds), model=ref.name, fingerprint=ref.fingerprint, dtype=dtype, subset=subset,
                       checkpoint=Path(ckpt).name if ckpt else None)
        self._user(a, ckpt)
        return Part(self._source(ckpt, task, trained) if ckpt else task)

    def _add_circuits(self, path: Path, arms: list[_Arm]) -> None:
        """The circuit states of the run directory `path` not stored yet: base and ICL on the base model, each
        fine-tuned model on its checkpoint (after its training, when it is trained now)."""
        run, (pairs, shots) = self.runs[path], self.circuits
        stored = run.spec_json()["arms"]
        first = next(iter(stored.values()))  # as compute_circuits: the first arm's first seed
        model = first["model"]
        tasks = tuple(dict.fromkeys(t for arm in stored.values() for t in arm["tasks"]))
        index = self.indexes[path] = read_index(run.path / CIRCUITS_DIR)
        circuits = Circuits(str(path), run, tasks, first["seeds"][0], shots, pairs, model["name"], model["fingerprint"],
                            arms[0].works.scale)
        self.add_circuits(circuits, [a.works for a in arms], index)

    def circuit_part(self, circuits: Circuits, work_id: str, task: str, state: str, ckpt, trained: bool,
                     key: dict) -> Part:
        payload = CircuitTask(model=circuits.model, fingerprint=circuits.affinity, task=task, state=state,
                              pairs=circuits.pairs, seed=circuits.seed, shots=circuits.shots,
                              checkpoint=key["checkpoint"])
        if ckpt is not None:
            payload = self._source(str(ckpt), payload, trained=trained)
            if str(ckpt) in self.users:
                self.users[str(ckpt)][0] += 1
        self.circuit_runs[work_id] = Path(circuits.key)
        return Part(payload)

    def _circuit_done(self, done: Finished) -> None:
        task = _task(done.work)
        path = self.circuit_runs[done.work.id]
        run = self.runs[path]
        if task.checkpoint is not None:
            self._used(str(run.path / ADAPTERS_DIR / task.checkpoint), done.error is not None)
        if done.error is not None:
            error = done.error.strip().splitlines()[-1]
            self.failures.append(f"{run.path.parent.name} circuits {task.task} {task.state}: {error}")
            logger.warning("circuits %s %s: FAILED %s", task.task, task.state, error)
            return
        name, key = state_key(task.task, task.state, task.checkpoint, task.pairs, task.seed)
        store_state(run.path / CIRCUITS_DIR, self.indexes[path], name, key, done.result[0])

    def _source(self, ckpt: str, task, trained: bool):
        """`task` reading the checkpoint `ckpt`: in place on a shared disk; else its files, from the training
        that makes it (`trained` in this graph) or, from an earlier run, read (once for all its tasks) from
        the run directory when it starts. One from an earlier run deleted on purpose is refused here, before
        anything runs (retrain_deleted made the conditions scored with it, and so their RSA and circuits,
        part of the to-do list: trained again)."""
        if not trained:
            what = (f"circuits of {task.task} {task.state}" if task.method == "circuits"
                    else f"{'RSA of ' if task.method == 'rsa' else ''}{unit_label(task.conds)}")
            check_needed([ckpt], False, what)
        if self.shared_disk:
            return dataclasses.replace(task, path=ckpt)
        if trained:
            return task
        self.puts.setdefault(ckpt, [None, 0])[1] += 1
        return _Reused(self, ckpt, task)

    def files(self, ckpt: str):
        """A reused checkpoint's files, read and put once for all its conditions."""
        entry = self.puts[ckpt]
        if entry[0] is None:
            entry[0] = self.backend.put(read_tree(Path(ckpt)))
        entry[1] -= 1
        handle = entry[0]
        if entry[1] == 0:
            del self.puts[ckpt]  # the tasks hold it from here on
        return handle

    def run(self, backend: Backend | None, max_held: int | None = None) -> Usage | None:
        """Run the works on `backend` (None: there must be none to run), at most `max_held` full checkpoints
        in flight (`Resources.checkpoints_in_flight`); finish every arm."""
        self.backend, usage = backend, None
        try:
            if self.works:
                usage = schedule(self.works, backend, self.on_done, max_held)
            if not self.failures:
                self._retain()
        except BaseException as e:
            for a in self.arms.values():
                if a.table is None:
                    a.state.interrupted(e)
            raise
        finally:
            self.close()
        for a in self.arms.values():  # arms with nothing to do
            if a.table is None:
                self._finish(a)
        return usage

    def _retain(self) -> None:
        """After a graph without failures: what the SFT arms' policy deletes and no work of this graph
        read (e.g. checkpoints whose conditions finished in an earlier run under `all`)."""
        for a in self.arms.values():
            arm = a.state.arm
            if arm.trains and not arm.lora and arm.spec.checkpoints_keep != "all":
                retain(a.state.run, arm.spec, rsa_read_after(self.rsa) if of_spec(arm.spec).rsa else None)

    def on_done(self, done: Finished) -> None:
        work = done.work
        method = _task(work).method if work.role == "scorer" else "train"
        if method == "circuits":
            self._circuit_done(done)
            return
        a = self.arms[work.arm]
        if work.role == "trainer":
            if done.error is None:
                result = done.result
                for name, files in result.get("files", {}).items():  # none on a shared disk: saved there
                    write_tree(Path(self.dirs[work.id][name]), files)
                self.trained[work.id] = {"trained": True, "seconds": result.get("seconds", 0.0),
                                         "worker": done.host}
                a.state.busy.add("trainer", done.host, float(result.get("seconds", 0.0)))
                logger.info("%s: trained %s in %.0f s on %s", a.state.arm.spec.arm, work.label,
                            result.get("seconds", 0.0), done.host)
            else:
                logger.warning("%s: %s FAILED %s", a.state.arm.spec.arm, work.label,
                               done.error.strip().splitlines()[-1])
        elif method == "rsa":
            self._rsa_done(a, done)
        else:
            task = _task(work)
            results = done.result if done.error is None else [(None, done.error)] * len(task.conds)
            for cond, (outcome, seconds) in zip(task.conds, results):
                if outcome is None:  # `seconds` holds the traceback
                    a.state.failed(cond, seconds, {"checkpoint_dir": task.checkpoint} if task.checkpoint else {})
                    continue
                note = ""
                if task.checkpoint is not None:
                    info = self.trained.get(work.needs[0], {}) if work.needs else {"trained": False}
                    note = training_note(info, a.shared.get(cond.id))
                a.state.done(cond, outcome, note, seconds, done.host)
            self._used(self._ckpt(a, task.checkpoint), any(outcome is None for outcome, _ in results))
        a.left -= 1
        if a.left == 0:
            self._finish(a)

    def _rsa_done(self, a: _Arm, done: Finished) -> None:
        task = _task(done.work)
        run = a.state.run
        if done.worker == "-":  # its scoring or training failed: recorded there, nothing was computed
            self._used(self._ckpt(a, task.checkpoint), True)
            return
        results = done.result if done.error is None else [(None, None, done.error)] * len(task.conds)
        self._used(self._ckpt(a, task.checkpoint), any(npz is None for npz, _, _ in results))
        for cond, (npz, summary, seconds) in zip(task.conds, results):
            if not run.is_done(cond):  # its scoring failed: recorded there
                continue
            cdir = run.condition_dir(cond)
            (cdir / RSA_JSON).unlink(missing_ok=True)  # from here on, nothing of an earlier pass is trusted
            if npz is None:  # `seconds` holds the traceback
                error = seconds.strip().splitlines()[-1]
                write_rsa_error(cdir, cond.id, task.dtype, task.subset, error, seconds)
                a.rsa_failed.append(cdir.name)
                logger.warning("RSA %s: FAILED %s", cond.label, error)
                continue
            write_rsa(cdir, cond.id, npz, task.dtype, task.subset, seconds)
            logger.info("RSA %s: %s (%.1f s on %s)", cond.label, summary, seconds, done.host)

    @staticmethod
    def _ckpt(a: _Arm, checkpoint: str | None) -> str | None:
        return str(a.state.run.path / ADAPTERS_DIR / checkpoint) if checkpoint else None

    def _user(self, a: _Arm, ckpt: str | None) -> None:
        """One more work reading `ckpt`, when its arm's policy deletes it once read."""
        arm = a.state.arm
        if ckpt is None or not arm.trains or arm.lora or arm.spec.checkpoints_keep == "all":
            return
        fraction = self.fractions.get(ckpt)
        if fraction is None:  # from an earlier run: its marker says
            fraction = read_marker(Path(ckpt)).get("fraction", 1.0) if is_finished(Path(ckpt)) else 1.0
        if deletable(arm.spec.checkpoints_keep, fraction, arm.lora):
            self.users.setdefault(ckpt, [0, False, arm.spec.checkpoints_keep])[0] += 1

    def _used(self, ckpt: str | None, failed: bool) -> None:
        """One work less reading a deletable checkpoint; it is deleted once all have succeeded, every
        condition of each included (a rerun of a failed one reads it again instead of training anew)."""
        if ckpt not in self.users:
            return
        entry = self.users[ckpt]
        entry[0] -= 1
        entry[1] = entry[1] or failed
        if entry[0] == 0:
            del self.users[ckpt]
            if not entry[1]:
                freed = delete_checkpoint(Path(ckpt), entry[2])
                logger.info("deleted checkpoint %s (checkpoints_keep: %s, %s freed): every work that reads it is done",
                            Path(ckpt).name, entry[2], _size(freed))

    def _finish(self, a: _Arm) -> None:
        try:
            # a one-arm graph's engines are its arm's; several arms share them: counted for the graph (graph.json)
            starts = self.backend.engine_starts() if len(self.arms) == 1 and self.backend is not None else None
            a.table = a.state.finish(engine_starts=starts)
        except ConditionsFailed as e:
            self.failures.append(f"{a.state.run.path.name} {a.state.arm.spec.arm}: {e}")
            logger.warning("%s", e)
            a.table = False
        if a.rsa_failed:
            self.failures.append(f"{a.state.run.path.name} {a.state.arm.spec.arm} RSA: {len(a.rsa_failed)} conditions "
                                 f"failed (their rsa.json holds the error): {', '.join(a.rsa_failed)}")
        self.tables[a.state.run.path] = a.table if a.table is not False else self.tables.get(a.state.run.path)

    def close(self) -> None:
        for run in self.runs.values():
            run.release_lock()


def rsa_read_after(rsa: tuple[str, str] | None):
    """What `iclsft.sft.retention.retain` waits for besides a condition's scoring: its RSA of (dtype,
    subset) current; None: nothing."""
    if rsa is None:
        return None
    return lambda cdir, condition_id: rsa_is_current(cdir, condition_id, *rsa)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _task(work: Work):
    """A scorer work's task (ScoreTask, RsaTask or CircuitTask), unwrapped from `_Reused`."""
    return work.payload.task if isinstance(work.payload, _Reused) else work.payload


class _Reused:
    """A reused checkpoint's scoring: its files are read (once) when the first of its conditions starts."""

    def __init__(self, graph: GraphRun, ckpt: str, task: ScoreTask):
        self.graph, self.ckpt, self.task = graph, ckpt, task

    def __call__(self):
        return dataclasses.replace(self.task, files=self.graph.files(self.ckpt))
