"""What runs on a sweep's workers, on any node: the scorer actor and the training task.

Nothing here reads or writes the driver's paths. The base model is resolved on the worker's own node
(`local_model`: its cache, or the hub) and proved to be the run's by its fingerprint. A training
saves its checkpoints in a scratch directory of its own and returns their files as data; a scorer
gets a checkpoint's files as data (Ray's object store), keeps them in its own scratch directory, and
returns each condition's `Outcome` for the driver to write.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import socket
import tempfile
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iclsft.arms import make_arm
from iclsft.arms.runner import STEP_ERRORS
from iclsft.arms.scorer import Scorer
from iclsft.artifacts import publish_dir
from iclsft.implicit.circuits import state_scores
from iclsft.models import (
    KNOWN_MODELS,
    ModelRef,
    _looks_like_path,
    check_model_dir,
    models_dir,
    quiet_loading,
    resolve_model,
)
from iclsft.models import fingerprint as fingerprint_of
from iclsft.rsa.run import Models, describe, npz_bytes, rsa_arrays
from iclsft.sft.adapters import is_finished
from iclsft.sft.train import train
from iclsft.spec import ModelSpec

KEEP_CHECKPOINTS = 4  # checkpoints a scorer keeps in its scratch directory (and engine) at once


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def local_model(name: str, fingerprint: str) -> ModelRef:
    """This node's copy of the run's base model. A known name or hub id is resolved from this node's cache
    (or hub); a model given as a directory is looked up in this node's model cache by fingerprint (copy
    it into $ICLSFT_HOME/models/ under any name), else read from that directory on this node. Raises
    ValueError when the copy found is not the run's model."""
    if name in KNOWN_MODELS or not _looks_like_path(name) and not Path(name).exists():
        ref = resolve_model(name)
    else:
        ref = cached_model(fingerprint) or resolve_model(name)
    if ref.fingerprint != fingerprint:
        raise ValueError(f"model {name!r} on {socket.gethostname()} ({ref.path}) has fingerprint {ref.fingerprint}, "
                         f"the run's is {fingerprint}: give every node the same weights")
    return ref


def cached_model(fingerprint: str) -> ModelRef | None:
    """The model directory in this node's cache ($ICLSFT_HOME/models/*) with this fingerprint, if any."""
    root = models_dir()
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            check_model_dir(path)
        except FileNotFoundError:
            continue
        if fingerprint_of(path) == fingerprint:
            return ModelRef(str(path), path, fingerprint)
    return None


def read_tree(path: Path) -> dict[str, bytes]:
    """Every file under `path`, by relative path: a checkpoint as data."""
    path = Path(path)
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def write_tree(final: Path, files: dict[str, bytes]) -> None:
    """Write a checkpoint sent as data into `final`, atomically (a complete directory or none); an already
    finished copy is kept."""
    final = Path(final)
    if is_finished(final):
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        try:
            publish_dir(tmp, final)
        except OSError:
            if not is_finished(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gpu_ids() -> list:
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except ImportError:
        return []


def train_task(job, model: str, fingerprint: str, threads: float | None = None) -> dict:
    """Train `job` on this node: the base model from this node's cache, the checkpoints saved in a scratch
    directory and returned as data (`files`: checkpoint directory name -> its files). `threads`: torch
    threads (the trainer slot's CPUs; default the job's own)."""
    base = local_model(model, fingerprint)
    with tempfile.TemporaryDirectory(prefix="iclsft-train-") as scratch:
        local = [(f, str(Path(scratch) / Path(d).name)) for f, d in job.checkpoints]
        result = train(dataclasses.replace(job, base_path=str(base.path), checkpoints=local,
                                           threads=max(1, int(threads)) if threads else job.threads))
        result["files"] = {Path(d).name: read_tree(Path(d)) for _, d in local}
    result["checkpoints"] = dict(job.checkpoints)
    result["gpus"] = gpu_ids()
    return result


def _value(handle):
    """A value sent through Ray's object store (inside a task, so not resolved by Ray itself)."""
    try:
        import ray
    except ImportError:
        return handle
    return ray.get(handle) if isinstance(handle, ray.ObjectRef) else handle


@dataclass
class ScoreTask:
    """Conditions to score one after another on a scorer actor: an ICL chain (one task, seed and order,
    K ascending: each prompt extends the last, whose KV the engine keeps) or every condition of one
    checkpoint (one adapter load or weight swap). The arm (its spec, built once per actor), the base
    model by name and fingerprint, and the checkpoint's directory name (None: the base model)."""

    arm: str  # the arm's key: one arm object per key on each actor
    spec: Any
    model: str
    fingerprint: str
    conds: tuple
    records: tuple = ()  # per condition: fields for its record
    checkpoint: str | None = None
    files: Any = None  # the checkpoint's files when they come from the run directory (not from a training)
    path: str | None = None  # the checkpoint's directory, when the scorer shares the driver's disk
    method = "score"  # the ScorerActor method that runs it


@dataclass
class RsaTask:
    """The RSA of a scoring unit's conditions on a scorer actor (HF hooks on the base model, or on their
    checkpoint, loaded once for all of them)."""

    conds: tuple
    model: str
    fingerprint: str
    dtype: str
    subset: str
    checkpoint: str | None = None
    files: Any = None  # as ScoreTask.files
    path: str | None = None  # as ScoreTask.path
    method = "rsa"


@dataclass
class CircuitTask:
    """One circuit state of one task of the implicit suite (attribution patching, HF hooks)."""

    model: str
    fingerprint: str
    task: str
    state: str
    pairs: int
    seed: int
    shots: int
    checkpoint: str | None = None
    files: Any = None  # as ScoreTask.files
    path: str | None = None  # as ScoreTask.path
    method = "circuits"


class ScorerActor:
    """Holds one engine per base model (opened once: full fine-tunes are swapped in where the engine can)
    and the arms that score with it; returns each condition's outcome, never writes the run."""

    def __init__(self, threads: float | None = 1, progress: bool = False, gpu_share: float = 1.0,
                 max_models: int = 1):
        """`threads`: torch's CPU threads (None: torch's choice). `gpu_share`: the part of its GPU this scorer
        holds; a vllm engine then takes that part of the memory vLLM would take on a whole GPU (unless the
        engine's gpu_memory_utilization is set). `max_models`: base models kept loaded at once; the least
        recently used one is closed beyond."""
        import torch

        quiet_loading()
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.progress, self.gpu_share, self.max_models = progress, gpu_share, max_models
        self.recent: OrderedDict[str, None] = OrderedDict()  # fingerprints of the loaded base models, LRU first
        self.arm_model: dict[str, str] = {}  # arm key -> its base model's fingerprint
        self.closed_starts = 0
        self.scratch = Path(tempfile.mkdtemp(prefix="iclsft-scorer-"))
        self.refs: dict[tuple, ModelRef] = {}
        self.scorers: dict[tuple, Any] = {}
        self.arms: dict[str, Any] = {}
        self.checkpoints: OrderedDict[str, Path] = OrderedDict()
        self.rsa_models: dict[str, Any] = {}  # dtype -> iclsft.rsa.run.Models (HF hooks need a plain model)

    def score(self, task: ScoreTask, trained: dict | None = None) -> tuple:
        """([per condition: (outcome, seconds) or (None, traceback)], worker, GPU ids); `trained`: the
        result of the training that made the checkpoint (its files among them). A condition that fails
        is reported and the others go on, as in the arm runner."""
        self._use(task.fingerprint)
        arm = self._arm(task)
        results = []
        try:
            ckpt = self._checkpoint_of(task, [trained])
        except STEP_ERRORS:  # e.g. a damaged checkpoint: every condition it serves fails
            return [(None, traceback.format_exc())] * len(task.conds), worker_name(), gpu_ids()
        for cond, record in zip(task.conds, task.records or [{}] * len(task.conds)):
            t0 = time.time()
            try:
                results.append((arm.outcome(cond, ckpt, record), time.time() - t0))
            except STEP_ERRORS:
                results.append((None, traceback.format_exc()))
        return results, worker_name(), gpu_ids()

    def rsa(self, task: RsaTask, *inputs) -> tuple:
        """([per condition: (rsa.npz bytes, summary line, seconds) or (None, None, traceback)], worker, GPU
        ids); `inputs`: the results of the conditions' scoring and, for a checkpoint trained in this sweep,
        of its training (its files among them)."""
        self._use(task.fingerprint)
        try:
            ckpt, models = self._checkpoint_of(task, inputs), self._models(task.dtype)
        except Exception:  # every condition of the unit fails alike (recorded in each rsa.json)
            return [(None, None, traceback.format_exc())] * len(task.conds), worker_name(), gpu_ids()
        results = []
        with models.loaded(task.conds[0].model, ckpt) as model:  # the checkpoint loaded once for the unit
            for cond in task.conds:
                t0 = time.time()
                try:
                    arrays = rsa_arrays(cond, models, ckpt, subset=task.subset, model=model)
                    results.append((npz_bytes(arrays), describe(arrays), time.time() - t0))
                except Exception:  # as compute_rsa: one condition's failure is recorded, the others go on
                    results.append((None, None, traceback.format_exc()))
        return results, worker_name(), gpu_ids()

    def circuits(self, task: CircuitTask, *inputs) -> tuple:
        """(the state's scores as .npz bytes, a summary line, worker, GPU ids); `inputs` as for `rsa`."""
        self._use(task.fingerprint)
        models, spec = self._models("float32"), ModelSpec(name=task.model, fingerprint=task.fingerprint)
        s = state_scores(models.base(spec), models.tokenizer(spec), task.task, task.state,
                         self._checkpoint_of(task, inputs), pairs=task.pairs, seed=task.seed, shots=task.shots)
        return (s.to_bytes(), f"{s.n_pairs} pairs, LD clean {s.ld_clean_mean:.2f}, corrupt {s.ld_corrupt_mean:.2f}",
                worker_name(), gpu_ids())

    def _models(self, dtype: str):
        """Plain HF models for hooks (RSA, circuits), one base per model and dtype, loaded once."""
        if dtype not in self.rsa_models:
            self.rsa_models[dtype] = Models(dtype, resolve=local_model)
        return self.rsa_models[dtype]

    def _checkpoint_of(self, task, inputs) -> str | None:
        """The task's checkpoint in this actor's scratch directory: its files from the training among
        `inputs` (results of the works it needed), else sent with the task."""
        if task.checkpoint is None:
            return None
        if task.path is not None:  # on the driver's disk: read there
            return self._checkpoint(task.checkpoint, path=Path(task.path))
        trained = next((i for i in inputs if isinstance(i, dict) and "files" in i), None)
        files = trained["files"][task.checkpoint] if trained is not None else _value(task.files)
        return self._checkpoint(task.checkpoint, files)

    def starts(self) -> int:
        """Engines opened by this actor, closed ones included."""
        return self.closed_starts + sum(s.starts for s in self.scorers.values())

    def _arm(self, task: ScoreTask):
        if task.arm not in self.arms:
            key = (task.model, task.fingerprint)
            if key not in self.refs:
                self.refs[key] = local_model(task.model, task.fingerprint)
            ref, spec = self.refs[key], task.spec
            engine = spec.engine
            if engine.name == "vllm" and engine.vllm.gpu_memory_utilization is None and 0 < self.gpu_share < 1:
                # vLLM's default 0.9 of the whole GPU would starve the trainings sharing it
                share = engine.vllm.model_copy(update={"gpu_memory_utilization": round(0.9 * self.gpu_share, 3)})
                engine = engine.model_copy(update={"vllm": share})
            sft = spec.training
            lora_rank = sft.lora_r if sft is not None and sft.method == "lora" else None
            # one engine per base model: arms of one model share it (hf serves adapters and swapped weights)
            skey = (engine.model_dump_json(), task.fingerprint, spec.dtype, None if engine.name == "hf" else lora_rank)
            if skey not in self.scorers:
                self.scorers[skey] = Scorer(engine, ref, spec.dtype, progress=self.progress, lora_rank=lora_rank)
            self.arms[task.arm] = make_arm(spec, ref, progress=self.progress, scorer=self.scorers[skey])
            self.arm_model[task.arm] = task.fingerprint
        return self.arms[task.arm]

    def _use(self, fingerprint: str) -> None:
        """Mark a base model as in use; close the least recently used ones beyond `max_models` (their
        engines, arms and hooks' models), so a sweep over several large models holds one at a time."""
        self.recent[fingerprint] = None
        self.recent.move_to_end(fingerprint)
        while len(self.recent) > self.max_models:
            old, _ = self.recent.popitem(last=False)
            for key in [k for k in self.scorers if k[1] == old]:
                scorer = self.scorers.pop(key)
                self.closed_starts += scorer.starts
                scorer.close()
            for arm in [a for a, f in self.arm_model.items() if f == old]:
                del self.arms[arm], self.arm_model[arm]
            for models in self.rsa_models.values():
                models.drop(old)
            gc.collect()


    def _checkpoint(self, name: str, files: dict[str, bytes] | None = None, path: Path | None = None) -> str:
        """The checkpoint `name`: its `files` written into the scratch directory, or read where it is (`path`);
        the engines keep the KEEP_CHECKPOINTS used last (the others released, and their copies removed)."""
        if name in self.checkpoints:
            self.checkpoints.move_to_end(name)
            return str(self.checkpoints[name])
        if path is None:
            path = self.scratch / name
            write_tree(path, files)
        self.checkpoints[name] = path
        while len(self.checkpoints) > KEEP_CHECKPOINTS:
            _, old = self.checkpoints.popitem(last=False)
            for scorer in self.scorers.values():
                scorer.release(old)
            if old.parent == self.scratch:
                shutil.rmtree(old, ignore_errors=True)
        return str(path)

    def close(self) -> None:
        for scorer in self.scorers.values():
            scorer.close()
        for models in self.rsa_models.values():
            models.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
