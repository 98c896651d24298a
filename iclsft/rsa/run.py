"""RSA over a run directory: a resumable pass after scoring (SPEC §7).

For each finished condition (record status ok) it writes, beside the condition's scores:

    rsa.npz    np.savez_compressed arrays (L = decoder layers, M = matrix points, N = lattice points)
               layers (L,)                   layer index
               bins (101,)                   histogram bin edges over [-1, 1]
               hist_resid, hist_mlp (L, 100) pair counts over all N(N-1)/2 lattice pairs i < j
               sub_resid, sub_mlp (L, M, M)  float16 cosine matrix of the matrix points, in their order
               sub_n1, sub_n2, sub_truth, sub_is_exemplar (M,)  the matrix points (iclsft.rsa.points):
                                             by default the condition's exemplars (at most 200) then
                                             test points (M = 400 where the lattice allows), each
                                             kind class 0 first; with subset "grid" the fixed
                                             balanced lattice subset, M = 2 x min(200, smallest class)
               collapse_resid, within_resid, between_resid, collapse_mlp, within_mlp, between_mlp (L,)
                                             over the lattice: mean within- minus between-class cosine
               within_exemplar_resid, within_test_resid, exemplar_test_resid, and the same _mlp (L,)
                                             mean matrix cosine over off-diagonal pairs of two
                                             exemplars, two test points, one of each (NaN if none)
    rsa.json   status, seconds, the matrix subset ("rsa_subset"), and size + sha256 of rsa.npz;
               written last. On failure: status error and the message.

Only an rsa.json with status ok, the same condition id, RSA version, dtype and matrix subset, whose
rsa.npz matches its checksum, is trusted; anything else is recomputed. Each file is written to a temporary
name and renamed into place, and the old rsa.json is removed before anything else, so an
interrupted pass never leaves a file that is later trusted.
"""

from __future__ import annotations

import io
import json
import logging
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from iclsft import __version__
from iclsft.artifacts import atomic_write_json, read_verified, write_checked
from iclsft.errors import ConditionsFailed, is_out_of_memory, out_of_memory
from iclsft.faults import fault_point
from iclsft.models import load_model, resolve_model
from iclsft.prompts import builder_for
from iclsft.rsa import activations as rsa_activations  # a module: tests replace its `activations`
from iclsft.rsa.points import DEFAULT_SUBSET, check_subset, matrix_points
from iclsft.rsa.stats import BINS, layer_stats
from iclsft.sft.checkpoints import load_checkpoint
from iclsft.spec import Condition, ModelSpec
from iclsft.store import RunDir
from iclsft.tasks import linear2d

RSA_VERSION = 2  # bump when what rsa.npz holds, or how it is computed, changes (2: exemplars in the matrix)
RSA_NPZ = "rsa.npz"
RSA_JSON = "rsa.json"
logger = logging.getLogger(__name__)


def read_rsa_record(condition_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(condition_dir) / RSA_JSON).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def rsa_is_current(condition_dir: str | Path, condition_id: str, dtype: str = "float32",
                   subset: str = DEFAULT_SUBSET) -> bool:
    """True when the condition's rsa.json says ok for this condition, version, dtype and matrix
    subset, and rsa.npz matches its size and checksum."""
    info = read_rsa_record(condition_dir)
    if not info or info.get("status") != "ok" or info.get("condition") != condition_id:
        return False
    if info.get("rsa_version") != RSA_VERSION or info.get("dtype") != dtype or info.get("rsa_subset") != subset:
        return False
    try:
        _verified_bytes(Path(condition_dir), info)
    except (OSError, ValueError, KeyError, TypeError):  # missing, changed, or a malformed record
        return False
    return True


def load_rsa(condition_dir: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a condition's rsa.npz, after checking it against the checksum in rsa.json."""
    cdir = Path(condition_dir)
    info = read_rsa_record(cdir)
    if info is None:
        raise FileNotFoundError(f"{cdir} has no RSA results ({RSA_JSON}); run the rsa step first")
    if info.get("status") != "ok":
        raise ValueError(f"RSA of {cdir.name} failed: {info.get('error', 'unknown error')}; rerun the rsa step")
    with np.load(io.BytesIO(_verified_bytes(cdir, info)), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _verified_bytes(cdir: Path, info: dict) -> bytes:
    try:
        expected = info["files"][RSA_NPZ]
    except (KeyError, TypeError):
        raise ValueError(f"{cdir / RSA_JSON} lists no checksum for {RSA_NPZ}; rerun the rsa step") from None
    return read_verified(cdir / RSA_NPZ, expected)


def compute_rsa(run_dir: str | Path, *, dtype: str = "float32", subset: str = DEFAULT_SUBSET,
                batch_size: int | None = None, progress: bool = True) -> list[str]:
    """Compute RSA for every finished condition of the run that lacks a current rsa.npz.

    Returns the names of the conditions computed now. A failing condition gets an rsa.json with
    status error and the others go on; afterwards `ConditionsFailed` is raised if any failed.
    `subset`: the matrix's points, "exemplars" (the condition's exemplars plus test inputs) or "grid"
    (the fixed balanced lattice subset); see iclsft.rsa.points. `batch_size`: queries per forward
    pass (default: as many as fit a fixed KV budget). Progress is logged (logger `iclsft.rsa.run`)."""
    check_subset(subset)
    run = RunDir(run_dir)
    if not (run.path / "spec.json").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no spec.json)")
    run.acquire_lock()  # released in the finally below: one process per run directory
    done, failed, todo = [], [], []
    models = None
    try:
        finished = run.finished()
        todo = [(cdir, cj, rec) for cdir, cj, rec in finished
                if not rsa_is_current(cdir, rec["condition"], dtype, subset)]
        logger.info("RSA: %d finished conditions, %d already done, %d to compute",
                    len(finished), len(finished) - len(todo), len(todo))
        models = Models(dtype)
        for i, (cdir, cond_json, record) in enumerate(todo, 1):
            t0 = time.time()
            (cdir / RSA_JSON).unlink(missing_ok=True)  # from here on, nothing of an earlier pass is trusted
            try:
                arrays = condition_rsa(run, cdir, cond_json, record, models, subset=subset, batch_size=batch_size,
                                       progress=progress)
                write_rsa(cdir, record["condition"], arrays, dtype, subset, time.time() - t0)
            except Exception as e:  # one condition's failure is recorded and the pass goes on
                failed.append(cdir.name)
                write_rsa_error(cdir, record["condition"], dtype, subset, e, traceback.format_exc())
                logger.warning("[%d/%d] RSA %s: FAILED %s: %s", i, len(todo), cdir.name, type(e).__name__, e)
                continue
            done.append(cdir.name)
            logger.info("[%d/%d] RSA %s: %.1f s, %s", i, len(todo), cdir.name, time.time() - t0, describe(arrays))
    finally:
        if models is not None:
            models.close()
        run.release_lock()
    if failed:
        raise ConditionsFailed(f"RSA failed for {len(failed)} of {len(todo)} conditions (their {RSA_JSON} holds the "
                               f"error): {', '.join(failed)}; rerun to retry them")
    return done


def describe(arrays: dict) -> str:
    """One condition's RSA in a few numbers, for progress lines."""
    mid = len(arrays["layers"]) // 2
    collapse = arrays["collapse_resid"]
    return (f"collapse (resid) layer {mid} {collapse[mid]:.3f}, last {collapse[-1]:.3f}; "
            f"within exemplars {arrays['within_exemplar_resid'][mid]:.3f}, within tests "
            f"{arrays['within_test_resid'][mid]:.3f}")


def rsa_base(condition_id: str, dtype: str, subset: str) -> dict:
    return {"condition": condition_id, "rsa_version": RSA_VERSION, "dtype": dtype, "rsa_subset": subset,
            "version": __version__}


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def write_rsa(cdir: Path, condition_id: str, arrays: dict | bytes, dtype: str, subset: str, seconds: float) -> None:
    """Write one condition's rsa.npz (the arrays, or their npz bytes), then its rsa.json (last: it makes it count)."""
    data = arrays if isinstance(arrays, bytes) else npz_bytes(arrays)
    if isinstance(arrays, bytes):
        with np.load(io.BytesIO(data)) as z:
            arrays = {k: z[k] for k in ("layers", "hist_resid", "sub_truth", "sub_is_exemplar")}
    npz = write_checked(cdir / RSA_NPZ, data)
    fault_point("rsa")
    atomic_write_json(cdir / RSA_JSON, {
        "status": "ok", **rsa_base(condition_id, dtype, subset), "seconds": round(seconds, 2),
        "layers": len(arrays["layers"]), "pairs": int(arrays["hist_resid"][0].sum()),
        "subset": len(arrays["sub_truth"]), "subset_exemplars": int(arrays["sub_is_exemplar"].sum()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": {RSA_NPZ: npz}})


def write_rsa_error(cdir: Path, condition_id: str, dtype: str, subset: str, error: BaseException | str,
                    trace: str) -> None:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    atomic_write_json(cdir / RSA_JSON, {"status": "error", **rsa_base(condition_id, dtype, subset), "error": message,
                                        "traceback": trace})


def condition_rsa(run: RunDir, cdir: Path, cond_json: dict, record: dict, models: Models, *,
                  subset: str = DEFAULT_SUBSET, batch_size: int | None = None,
                  progress: bool = False) -> dict[str, np.ndarray]:
    """The rsa.npz arrays of one finished condition of `run`, from the same prompts as its scoring (its
    files verified, its stored exemplars checked against the stream)."""
    cond = Condition.model_validate({k: v for k, v in cond_json.items() if k != "id"})
    if cond.id != record["condition"]:
        raise ValueError(f"{cdir / 'condition.json'} hashes to {cond.id}, its record says {record['condition']}")
    run.verify(cdir, record)
    checkpoint = None
    if cond.method == "icl":
        exemplars = linear2d.exemplars(cond.task, cond.seed, cond.shots, cond.order)
        stored = pd.read_parquet(cdir / "exemplars.parquet")
        if not stored[["n1", "n2", "truth"]].reset_index(drop=True).equals(exemplars[["n1", "n2", "truth"]]):
            raise ValueError(f"{cdir / 'exemplars.parquet'} is not the exemplar stream of seed {cond.seed} at "
                             f"K={cond.shots} (order {cond.order}); the condition was scored with other exemplars")
    else:
        if not record.get("checkpoint_dir"):
            raise ValueError(f"the record of SFT condition {cdir.name} names no checkpoint_dir")
        checkpoint = run.path / "adapters" / record["checkpoint_dir"]
    return rsa_arrays(cond, models, checkpoint, subset=subset, batch_size=batch_size, progress=progress)


def rsa_arrays(cond: Condition, models: Models, checkpoint: str | Path | None = None, *,
               subset: str = DEFAULT_SUBSET, batch_size: int | None = None,
               progress: bool = False, model=None) -> dict[str, np.ndarray]:
    """The rsa.npz arrays of one condition: the base model after its ICL prompt, or its fine-tuned
    `checkpoint` zero-shot. Reads nothing of the run (a scorer actor computes it from data). `model`:
    that model already loaded (`models.loaded`), for several conditions of one checkpoint."""
    tokenizer = models.tokenizer(cond.model)
    builder = builder_for(tokenizer, cond.template, cond.task)  # as scoring: labels, and words for `semantic`
    # the condition's 2K points, as scoring and training take them: the ICL prompt's exemplars and the SFT data
    exemplars = linear2d.exemplars(cond.task, cond.seed, cond.shots, cond.order)
    points = linear2d.queries(cond.task, exemplars)
    matrix = matrix_points(points, exemplars, subset)
    # the lattice, then the matrix points off it (exemplars), each read as a query after the same prefix
    n1 = np.concatenate([points.n1.to_numpy(), matrix.extra.n1.to_numpy()])
    n2 = np.concatenate([points.n2.to_numpy(), matrix.extra.n2.to_numpy()])
    # a fine-tuned model is scored zero-shot: the prompt is BOS/header + query
    prefix = builder.prefix(exemplars.n1, exemplars.n2, exemplars.truth) if checkpoint is None else builder.start()
    loaded = _nothing_to_release(model) if model is not None else models.loaded(cond.model, checkpoint)
    query_ids = builder.queries_after(prefix, n1, n2)  # tokenized in their context, as scoring does
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with loaded as model:
        try:
            resid, mlp = rsa_activations.activations(model, prefix, query_ids, batch_size=batch_size, pad_id=pad_id,
                                     progress=progress)
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            raise out_of_memory(f"reading activations of {cond.dirname}", "run `iclsft-eval rsa RUN --batch-size N` "
                                "with a smaller N (queries per forward pass)", e) from e
    truth = points.truth.to_numpy()
    out = {"layers": np.arange(resid.shape[0], dtype=np.int64), "bins": BINS.copy()}
    for name, acts in (("resid", resid), ("mlp", mlp)):
        stats = layer_stats(acts, truth, matrix.source, matrix.is_exemplar)
        out.update({f"{key}_{name}": value for key, value in stats.items()})
    out.update(sub_n1=matrix.n1, sub_n2=matrix.n2, sub_truth=matrix.truth, sub_is_exemplar=matrix.is_exemplar)
    return out


@contextmanager
def _nothing_to_release(model):
    yield model


class Models:
    """Loads each base model and tokenizer once; attaches LoRA adapters to it, or loads a full
    fine-tune, for one condition at a time."""

    def __init__(self, dtype: str, resolve=None):
        self.dtype = dtype
        self._resolve = resolve  # (name, fingerprint) -> ModelRef; default: resolve_model, fingerprint checked
        self._refs: dict[ModelSpec, object] = {}
        self._tokenizers: dict[ModelSpec, object] = {}
        self._bases: dict[ModelSpec, object] = {}

    def ref(self, spec: ModelSpec):
        if spec not in self._refs and self._resolve is not None:
            self._refs[spec] = self._resolve(spec.name, spec.fingerprint)
        if spec not in self._refs:
            ref = resolve_model(spec.name)
            if ref.fingerprint != spec.fingerprint:
                raise ValueError(f"model {spec.name!r} is not the one the run scored (fingerprint {ref.fingerprint}, "
                                 f"the run's {spec.fingerprint}); RSA needs the same weights")
            self._refs[spec] = ref
        return self._refs[spec]

    def tokenizer(self, spec: ModelSpec):
        if spec not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[spec] = AutoTokenizer.from_pretrained(self.ref(spec).path)
        return self._tokenizers[spec]

    def base(self, spec: ModelSpec):
        if spec not in self._bases:
            self._bases[spec], _ = load_model(self.ref(spec), self.dtype)
        return self._bases[spec]

    def loaded(self, spec: ModelSpec, checkpoint: str | Path | None = None):
        """A context holding the base model, or the verified `checkpoint` on it (released on exit)."""
        return _nothing_to_release(self.base(spec)) if checkpoint is None else self.checkpoint(spec, checkpoint)

    def checkpoint(self, spec: ModelSpec, path: Path):
        """The verified checkpoint at `path` on this spec's base (iclsft.sft.checkpoints.load_checkpoint)."""
        return load_checkpoint(self.base(spec), path, dtype=self.dtype)

    def drop(self, fingerprint: str) -> None:
        """Forget the base model (and tokenizer) with this fingerprint, to load another in its place."""
        for cache in (self._bases, self._tokenizers, self._refs):
            for spec in [s for s in cache if s.fingerprint == fingerprint]:
                del cache[spec]

    def close(self) -> None:
        self._bases.clear()
