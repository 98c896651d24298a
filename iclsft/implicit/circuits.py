"""Circuit shift of the implicit-pattern suite (docs/implicit.md states exactly what is measured).

Per task, on (pattern-holds, pattern-broken) question pairs of equal token length: attribution
patching scores per attention head and MLP block (iclsft.circuits) for three model states, each
read at the answer position with LD = log p(clean answer) - log p(broken answer):

    base   the base model, zero-shot prompt (instruction + question)
    icl    the base model with `shots` pattern-holds demos before the question
    <sft>  each fine-tuned model of the run (lora, full), zero-shot prompt

and the shift of icl and of each fine-tuned model relative to base: 1 - cosine of the score
vectors, and 1 - Jaccard of the top-5% components by |score|, separately for heads and MLPs.
Results: RUN/circuits/<task>-<state>.npz and RUN/circuits/circuits.json (written last; a state
whose .npz is listed there with a matching checksum is not recomputed).
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import pandas as pd

from iclsft.artifacts import atomic_write_json, write_checked
from iclsft.circuits import ComponentScores, PromptPair, attribution_scores, circuit_shift
from iclsft.faults import fault_point
from iclsft.implicit.data import TaskPrompts, demo_stream, derived_seed
from iclsft.models import load_model, resolve_model
from iclsft.sft.adapters import ADAPTERS_DIR
from iclsft.sft.checkpoints import load_checkpoint
from iclsft.store import RunDir
from iclsft.tasks.implicit import get_task, pair

logger = logging.getLogger(__name__)
CIRCUITS_DIR = "circuits"


def circuit_pairs(prompts: TaskPrompts, n: int, seed: int, prefix: list[int]) -> list[PromptPair]:
    """Up to `n` pairs of equal token length whose answers differ (read where they first differ)."""
    out = []
    drawn = pair(prompts.task, n, derived_seed("circuits", prompts.task.name, seed),
                 count_tokens=lambda text: len(prompts.questions([text])[0]))  # as in a prompt
    for holds, broken in drawn:
        clean, corrupt = prompts.query(holds), prompts.query(broken)
        target, foil = prompts.answer_ids(holds), prompts.answer_ids(broken)
        # answers that start alike (" 12" and " 15": " ", "1") are compared where they first differ:
        # the shared tokens are appended to both questions, as the model would have produced them
        common = next((i for i, (a, b) in enumerate(zip(target, foil)) if a != b), None)
        if common is None:
            continue
        clean, corrupt = clean + target[:common], corrupt + target[:common]
        target, foil = target[common:], foil[common:]
        if len(clean) == len(corrupt):
            out.append(PromptPair(clean=clean, corrupt=corrupt, target=target, foil=foil, prefix=prefix))
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"task {prompts.task.name!r}: no question pair has equal token lengths and different "
                         "answers")
    return out


def compute_circuits(path: str | Path, *, pairs: int = 32, shots: int = 8, seed: int | None = None) -> pd.DataFrame:
    """Scores and shifts of every task of the implicit run at `path`; returns the shift table. A state
    whose .npz circuits.json lists with a matching checksum is read, not recomputed; fine-tuned models
    are loaded only after their checkpoint verifies (iclsft.sft.checkpoints)."""

    run = RunDir(path)
    arms = run.spec_json()["arms"]
    icl_like = next(iter(arms.values()))
    ref = resolve_model(icl_like["model"]["name"])
    if ref.fingerprint != icl_like["model"]["fingerprint"]:
        raise ValueError(f"model {ref.name!r} has changed since {run.path} was computed (fingerprint differs)")
    seed = icl_like["seeds"][0] if seed is None else seed
    tasks = list(dict.fromkeys(t for arm in arms.values() for t in arm["tasks"]))
    out = run.path / CIRCUITS_DIR
    index = read_index(out)
    run.acquire_lock()
    try:
        base = tokenizer = None  # loaded only if a state is not stored yet
        rows = []
        for task in tasks:
            scores = {}
            for state, ckpt in circuit_states(run, task, seed, shots).items():
                name, key = state_key(task, state, ckpt, pairs, seed)
                stored = stored_scores(out, name, index, key)
                if stored is not None:
                    scores[state] = stored
                    continue
                if base is None:
                    base, tokenizer = load_model(ref, "float32")
                s = state_scores(base, tokenizer, task, state, ckpt, pairs=pairs, seed=seed, shots=shots)
                scores[state] = store_state(out, index, name, key, s)
            for state, s in scores.items():
                if state == "base":
                    continue
                shift = circuit_shift(scores["base"], s)
                rows.append({"task": task, "state": state, "n_pairs": s.n_pairs,
                             "heads_cosine": shift["heads"]["cosine"], "heads_jaccard": shift["heads"]["jaccard"],
                             "mlps_cosine": shift["mlps"]["cosine"], "mlps_jaccard": shift["mlps"]["jaccard"],
                             "ld_clean": s.ld_clean_mean, "ld_corrupt": s.ld_corrupt_mean})
        table = pd.DataFrame(rows)
        atomic_write_json(out / "shift.json", table.to_dict(orient="records"))  # under the lock, like the rest
    finally:
        run.release_lock()
    return table


def circuit_states(run: RunDir, task: str, seed: int, shots: int, checkpoints: dict[str, Path] | None = None
                   ) -> dict[str, Path | None]:
    """{state: checkpoint dir or None} of one task: base, ICL at `shots`, and each fine-tuned model (the
    run's finished ones, then `checkpoints`: {method: dir} of models being trained now)."""
    return {"base": None, f"icl-K{shots}": None, **_finetuned(run, task, seed), **(checkpoints or {})}


def state_key(task: str, state: str, ckpt: str | Path | None, pairs: int, seed: int) -> tuple[str, dict]:
    """The state's file name and what its circuits.json entry must hold to be reused. The checkpoint by
    its directory name (a hash of its training): valid wherever the run is moved."""
    return f"{task}-{state}.npz", {"pairs": pairs, "seed": seed, "checkpoint": Path(ckpt).name if ckpt else None}


def state_scores(base, tokenizer, task: str, state: str, ckpt: str | Path | None, *, pairs: int, seed: int,
                 shots: int) -> ComponentScores:
    """Attribution scores of one state of one task: the base model zero-shot or after `shots` demos, or a
    fine-tuned checkpoint zero-shot (a LoRA adapter is attached to `base` and taken out again)."""
    import torch

    p = TaskPrompts(tokenizer, get_task(task))
    prefix = p.prefix(demo_stream(p.task, seed)[:shots]) if state.startswith("icl-") else p.start
    loaded = nullcontext(base) if ckpt is None else load_checkpoint(base, ckpt)
    with loaded as model, torch.enable_grad():
        return attribution_scores(model, circuit_pairs(p, pairs, seed, prefix))


def store_state(out: Path, index: dict, name: str, key: dict, scores: ComponentScores | bytes) -> ComponentScores:
    """Write one state's scores (or their bytes) and its entry in circuits.json (after each state: an
    interruption loses one)."""
    data = scores if isinstance(scores, bytes) else scores.to_bytes()
    s = ComponentScores.from_bytes(data) if isinstance(scores, bytes) else scores
    digest = write_checked(out / name, data)
    fault_point("circuits")
    index[name] = {**key, **digest, "ld_clean": s.ld_clean_mean, "ld_corrupt": s.ld_corrupt_mean,
                   "n_pairs": s.n_pairs}
    atomic_write_json(out / "circuits.json", index)
    logger.info("%s: %d pairs, LD clean %.2f, corrupt %.2f", name.removesuffix(".npz"), s.n_pairs,
                s.ld_clean_mean, s.ld_corrupt_mean)
    return s


def load_shift(path: str | Path) -> pd.DataFrame | None:
    f = Path(path) / CIRCUITS_DIR / "shift.json"
    return pd.DataFrame(json.loads(f.read_text())) if f.is_file() else None


def read_index(out: Path) -> dict:
    try:
        return json.loads((out / "circuits.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def stored_scores(out: Path, name: str, index: dict, key: dict) -> ComponentScores | None:
    """The scores of `name` when circuits.json lists them for this `key` and the file still matches."""
    info = index.get(name)
    if not isinstance(info, dict) or any(info.get(k) != v for k, v in key.items()):
        return None
    try:
        return ComponentScores.load(out / name, info)
    except ValueError:  # missing, cut short or changed: computed again
        return None


def _finetuned(run: RunDir, task: str, seed: int) -> dict[str, Path]:
    """{method: checkpoint dir} of the run's finished fine-tuned models for this task and seed."""
    found = {}
    for _cdir, cond, record in run.finished():
        if cond.get("task") == task and cond.get("seed") == seed and cond.get("method") != "icl":
            found[cond["method"]] = run.path / ADAPTERS_DIR / record["checkpoint_dir"]
    return dict(sorted(found.items()))
