"""What is benchmarked: the methods, the run's settings (BenchSpec, checked on creation) and what
each method did on each workload."""

from __future__ import annotations

from dataclasses import dataclass

from iclsft.names import DEFAULT_MODEL, DTYPES

METHODS = ("naive", "hf", "hf-mask", "vllm", "vllm-plain", "lm-eval")
HF_OPTIONS = {"hf": {}, "hf-mask": {"attention": "mask", "merge_lora": False}}
VLLM_METHODS = ("vllm", "vllm-plain", "lm-eval")
GRID = 10_000
# max |Δ log-prob| against the naive loop that still counts as agreement: fp32 kernels differ by ~1e-5
# (docs/findings.md: vllm vs hf up to 7e-5); bf16 by ~0.1 nats (tests/test_engine_hf.py BF16_TOL)
AGREE = {"float32": 1e-3, "bfloat16": 0.3}
CPU_KV_CACHE_BYTES = 4 * 2**30  # vLLM's CPU default is half the machine's memory; the machine is shared


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark run. `queries`: grid queries scored by `hf` (all 10,000 = the full grid); the
    sampled methods use the first `naive_sample` / `vllm_sample` of a fixed random order of them."""

    model: str = DEFAULT_MODEL
    shots: tuple[int, ...] = (10, 100, 200)
    queries: int = GRID
    adapters: int = 3
    lora_rank: int = 8
    methods: tuple[str, ...] = METHODS
    naive_sample: int = 4
    vllm_sample: int = 32
    dtype: str = "float32"
    angle: float = 90.0
    token_budget: int = 1024
    threads: int | None = None
    vllm_block_size: int | None = None  # our vllm engine's KV block size (prefix-cache granularity); None: the engine's
    seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods {list(self.methods)}: choose from {', '.join(METHODS)}")
        if not 1 <= self.queries <= GRID:
            raise ValueError(f"queries {self.queries} must be in 1..{GRID}")
        if any(k < 1 for k in self.shots) or (not self.shots and not self.adapters):
            raise ValueError(f"shots {list(self.shots)} must be >= 1, and some work must be given (shots or adapters)")
        if self.adapters < 0 or self.lora_rank < 1:
            raise ValueError(f"adapters {self.adapters} must be >= 0 and lora_rank {self.lora_rank} >= 1")
        for name in ("naive_sample", "vllm_sample"):
            if not 1 <= getattr(self, name) <= self.queries:
                raise ValueError(f"{name} {getattr(self, name)} must be in 1..queries ({self.queries})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not allowed: choose one of {', '.join(DTYPES)}")


@dataclass
class Work:
    name: str  # e.g. "ICL K=10", "adapters r=8"
    prefix: list[int]
    adapters: list[str | None]  # [None] for ICL


@dataclass
class Timing:
    """What one method did on one workload (summed over its adapters)."""

    queries: int = 0
    seconds: float = 0.0
    computed_tokens: float = 0.0  # tokens run through the model
    flops: float = 0.0
    max_abs_diff: float | None = None  # vs naive, on the naive sample

    def add(self, queries: int, seconds: float, tokens: float, flops: float) -> None:
        self.queries += queries
        self.seconds += seconds
        self.computed_tokens += tokens
        self.flops += flops
