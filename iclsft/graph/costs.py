"""Estimated seconds and bytes of each piece of work, from measured rates (docs/sweep.md). The scheduler
orders work with them (longest trainings first); the planner and the simulator (`sweep --dry-run`,
`sweep --simulate`) add them up and replay them."""

from __future__ import annotations

import functools
from pathlib import Path

from iclsft.study import get

# Per device kind, for a SmolLM2-135M-class model: seconds per query (a + b * prefix tokens), per
# training step (LoRA / full), to load the base model (once per training, and once per scorer for the
# RSA hooks), and to start a scoring engine (once per scorer and base model; an engine that cannot swap
# a full fine-tune's weights starts once more per full checkpoint; the others read each checkpoint into the
# running engine: swap_per_gb seconds per GB of its files). `measured` says which are.
RATES = {
    # hf engine, fp32, 2 threads, full grid (docs/benchmarks/throughput.md): 132 q/s at a 166-token
    # prefix, 97 at 1,650, 68 at 3,317 -> 7.2 ms + 2.26 us per prefix token; LoRA r 8: 125 steps in
    # ~60 s (docs/sft.md); vllm start 26-38 s (docs/benchmarks/throughput*.md). Per condition beyond its
    # queries (prompt, metrics, files): ~0.7 s, and ~2 s more for RSA (its pair histograms), from the
    # demo sweep's ICL arm (26 s for 16 conditions of 100 queries) and RSA (~90 s for 32) in docs/sweep.md
    # A model far smaller than SmolLM2 still pays per step and per training what does not shrink with
    # it (Python, optimizer, saving): `step_floor` and `load_floor`, the tests' tiny Llama's LoRA step and
    # fixed seconds (benchmarks/train_overhead.py: 0.020 s a step, 0.10 s a training; SmolLM2 0.48 and 0.46)
    "cpu": {"query": 1 / 140, "per_prefix_token": 2.26e-6, "condition": 0.7, "rsa_condition": 2.0,
            "lora_step": 0.5, "full_step": 1.0, "model_load": 2.0, "engine_start": 1.0, "vllm_start": 38.0,
            "swap_per_gb": 1.0, "step_floor": 0.02, "load_floor": 0.1,
            "measured": ("query", "per_prefix_token", "condition", "rsa_condition", "lora_step", "vllm_start",
                         "step_floor", "load_floor")},
    # scoring: hf engine, bf16, one H100 (docs/benchmarks/gpu_hf_h100.json, 13.6-17.5k q/s at an 8k token
    # budget, flat in the prefix); the rest assumed, not measured on a GPU yet
    "gpu": {"query": 1 / 13_600, "per_prefix_token": 0.0, "condition": 0.1, "rsa_condition": 0.2,
            "lora_step": 0.05, "full_step": 0.08, "model_load": 5.0, "engine_start": 5.0, "vllm_start": 40.0,
            "swap_per_gb": 0.5, "step_floor": 0.0, "load_floor": 0.0,  # floors not measured on a GPU: none
            "measured": ("query", "per_prefix_token")},
}

# The rates are SmolLM2-135M's on the 2D task. Another model's are scaled by its compute per token
# (`model_scale`): forward FLOPs are 2 x (decoder linears + output head) per token through both, and the
# engine runs the head only where a label is read, so a scored query (~QUERY_TOKENS tokens) costs its
# tokens through the body and ~HEAD_ROWS rows of the head; a training step runs both on every token of
# its examples, which are EXAMPLE_TOKENS long per study; the prefix's per-token cost is the attention's
# width (layers x heads x head size). EXAMPLE_TOKENS, measured with both shipped tokenizers (2026-12-07):
# a 2D exemplar 7.7-8.2 tokens; an implicit item (question and answer) 38 (expression), 61 (boolean),
# 99-104 (code), 115 (relation), ~80 over the four tasks.
REFERENCE_SHAPE = {"body": 106_168_320, "head": 576 * 49_152, "attention": 30 * 9 * 64, "params": 134_515_008}
QUERY_TOKENS, HEAD_ROWS = 6, 1.5
EXAMPLE_TOKENS = {"linear2d": 9.0, "implicit": 80.0}  # the built-in studies' `Study.example_tokens`
REFERENCE_EXAMPLE_TOKENS = EXAMPLE_TOKENS["linear2d"]  # the examples the rates were measured on

# Bytes a condition leaves in its run directory: scores.parquet (~20 B per query: n1, n2, truth,
# is_exemplar, two float64 log-probs) and field.npy (4 B per query) measured on a 10,000-query
# condition (201 KB + 40 KB); exemplars.parquet, record and metrics ~4 KB.
SCORE_BYTES_PER_QUERY = 24
CONDITION_BYTES = 4_000
RSA_POINTS = 400  # the matrix's points (iclsft.rsa.points.MATRIX_SIZE)
CHECKPOINT_BYTES_PER_PARAM = 4  # checkpoints keep the training weights' dtype: fp32 (bf16-mixed too)


def model_scale(shape: dict | None) -> dict[str, float]:
    """How much slower than the reference model (SmolLM2-135M) a model of `shape` (`model_shape`) is per
    scored query, per prefix token, per training token and per load; all 1.0 for None."""
    if shape is None or "body" not in shape:
        return {"query": 1.0, "prefix": 1.0, "train": 1.0, "load": 1.0}
    ref = REFERENCE_SHAPE

    def per_query(s):
        return QUERY_TOKENS * s["body"] + HEAD_ROWS * s["head"]

    return {"query": per_query(shape) / per_query(ref), "prefix": shape["attention"] / ref["attention"],
            "train": (shape["body"] + shape["head"]) / (ref["body"] + ref["head"]),
            "load": shape["params"] / ref["params"]}


def score_seconds(queries: int, prefix_tokens: float, device: str, scale: dict | None = None) -> float:
    """Scoring one condition (on a model `scale` times the reference's cost: `model_scale`)."""
    r, s = RATES[device], scale or model_scale(None)
    return queries * (r["query"] * s["query"] + r["per_prefix_token"] * s["prefix"] * prefix_tokens) + r["condition"]


def rsa_seconds(queries: int, prefix_tokens: float, device: str, scale: dict | None = None) -> float:
    """One condition's RSA: one more pass over its queries (activations), then its pair statistics."""
    r, s = RATES[device], scale or model_scale(None)
    return (queries * (r["query"] * s["query"] + r["per_prefix_token"] * s["prefix"] * prefix_tokens)
            + r["rsa_condition"])


def train_seconds(steps: int, method: str, device: str, scale: dict | None = None, study: str = "linear2d") -> float:
    """One training: its steps (examples of `study`'s length, on a model `scale` times the reference's cost)
    and the base model's load."""
    s = scale or model_scale(None)
    tokens = get(study).example_tokens / REFERENCE_EXAMPLE_TOKENS
    step = max(step_seconds(method, device) * s["train"] * tokens, RATES[device]["step_floor"])
    return steps * step + load_seconds(device, s)


def load_seconds(device: str, scale: dict | None = None) -> float:
    """Loading a model `scale` times the reference's size (a training's base model, RSA's and circuits'
    hooked model, a full checkpoint for its RSA)."""
    r = RATES[device]
    return max(r["model_load"] * (scale or model_scale(None))["load"], r["load_floor"])


def step_seconds(method: str, device: str) -> float:
    """One training step of the reference model on 2D examples."""
    r = RATES[device]
    return r["lora_step"] if method == "lora" else r["full_step"]


def engine_start_seconds(engine: str, device: str) -> float:
    """Starting a scoring engine with the base model: vllm compiles and sizes its cache; the hf engine
    loads the model."""
    r = RATES[device]
    return r["vllm_start"] if engine.startswith("vllm") else r["engine_start"] + r["model_load"]


def swap_seconds(checkpoint_bytes: int, device: str) -> float:
    """Reading a full checkpoint's weights into a running engine (hf: copied into its model; vllm: reloaded
    in place, then its prefix cache emptied)."""
    return checkpoint_bytes / 1e9 * RATES[device]["swap_per_gb"]


def prefix_tokens(cond) -> float:
    """Approximate prompt tokens before the queries: its study's `example_tokens` per example in the prompt
    (2K exemplars of the 2D study, K implicit demonstrations; none for a fine-tuned model, scored zero-shot)."""
    return float(get(cond.STUDY).example_tokens * cond.prompt_examples)


def condition_bytes(cond) -> int:
    return cond.queries * SCORE_BYTES_PER_QUERY + CONDITION_BYTES


@functools.lru_cache(maxsize=16)
def model_shape(path: str) -> dict:
    """From a model directory's config, without its weights: parameters (tied weights once), decoder
    layers, and the (in, out) features of each linear module by its last name (`q_proj`, ...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(Path(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears: dict[str, list[tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))
    text = getattr(config, "text_config", None) or config
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {"params": sum(p.numel() for p in model.parameters()), "layers": int(config.num_hidden_layers),
            "linears": linears, "head": sum(i * o for i, o in linears.get("lm_head", ())),
            "body": sum(i * o for name, shapes in linears.items() if name != "lm_head" for i, o in shapes),
            "attention": int(text.num_hidden_layers) * heads * int(head_dim)}


def full_checkpoint_bytes(shape: dict) -> int:
    return shape["params"] * CHECKPOINT_BYTES_PER_PARAM


def lora_adapter_bytes(shape: dict, sft) -> int:
    """A LoRA adapter's weights: r x (in + out) per targeted linear module, in fp32."""
    params = sum(sft.lora_r * (i + o) for name in sft.target_modules for i, o in shape["linears"].get(name, ()))
    return params * CHECKPOINT_BYTES_PER_PARAM


def rsa_bytes(shape: dict) -> int:
    """At most (np.savez_compressed rarely shrinks cosines much): two float16 M x M matrices per layer."""
    return 2 * shape["layers"] * RSA_POINTS * RSA_POINTS * 2
