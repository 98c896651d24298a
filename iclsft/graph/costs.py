"""Estimated seconds of each piece of work, from measured rates (docs/sweep.md). The scheduler orders
work with them (longest trainings first); the planner and the simulator (`sweep --dry-run`,
`sweep --simulate`) add them up and replay them."""

from __future__ import annotations

# Measured throughput, per device kind (SmolLM2-135M-class model): seconds per query (a + b * prefix
# tokens), per training step (LoRA / full); starting an engine and loading the base model, once per
# scorer and once per training.
RATES = {
    # hf engine, fp32, 2 threads, full grid (docs/benchmarks/throughput.md): 132 q/s at a 166-token
    # prefix, 97 at 1,650, 68 at 3,317 -> 7.2 ms + 2.26 us per prefix token
    "cpu": {"query": 1 / 140, "per_prefix_token": 2.26e-6, "lora_step": 0.5, "full_step": 1.0,
            "model_load": 2.0, "engine_start": 1.0},
    "gpu": {"query": 1 / 13_600, "per_prefix_token": 0.0, "lora_step": 0.05, "full_step": 0.08,
            "model_load": 5.0, "engine_start": 5.0},
}


def score_seconds(queries: int, prefix_tokens: float, device: str) -> float:
    r = RATES[device]
    return queries * (r["query"] + r["per_prefix_token"] * prefix_tokens)


def train_seconds(steps: int, method: str, device: str) -> float:
    r = RATES[device]
    return steps * (r["lora_step"] if method == "lora" else r["full_step"]) + r["model_load"]


def condition_queries(cond) -> int:
    """Queries scored for a condition of either study: the 2D lattice, or the implicit evaluation set."""
    from iclsft.tasks.linear2d import GRID

    task = getattr(cond, "task", None)
    if hasattr(task, "grid_step"):
        return (GRID // task.grid_step) ** 2
    return int(cond.eval_size)


def prefix_tokens(cond) -> float:
    """Approximate prompt tokens before the queries: ~9 per 2D exemplar (2K of them), ~40 per implicit demo."""
    shots = getattr(cond, "shots", 0) or 0
    return 18.0 * shots if hasattr(getattr(cond, "task", None), "grid_step") else 40.0 * shots
