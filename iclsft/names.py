"""The one source of the names a user types: models, methods, engines and the other choices of specs,
configs and the CLI (task names come from the task registry, `iclsft.tasks.registry.names(study)`).
Spec fields spell their choices `Literal[NAMES]`, CLI options `click.Choice(NAMES)`."""

DEFAULT_MODEL = "smollm2-135m"  # the test suite's fast model (iclsft.models.KNOWN_MODELS has both)
STUDY_MODEL = "gemma3-270m"  # the shipped model that learns the task: the demo's and the reproductions'

SFT_METHODS = ("lora", "full", "full-frozen-unembed")  # the 2D study's fine-tuning methods (SPEC §6)
METHODS = ("icl", *SFT_METHODS)
IMPLICIT_METHODS = ("icl", "lora", "full")  # the implicit suite's arms (SPEC §8)
RECIPES = ("ours", "original")  # the implicit suite's fine-tuning recipes
ENGINES = ("hf", "vllm", "vllm-server")  # the built-in engines; `engines()` adds registered ones
ENGINE_CHOICES = ("auto", *ENGINES)  # "auto": vllm on a GPU where vLLM is installed, else hf
DTYPES = ("float32", "bfloat16")
VLLM_DTYPES = (*DTYPES, "float16")  # what vLLM serves in (`serve --dtype`)
PREFIX_KERNELS = ("flash", "gemm")  # the hf engine's prefix attention (iclsft.engine.tree_attention)
PRECISIONS = ("fp32", "bf16-mixed")  # SFT: fp32, or bf16 autocast with the loss from fp32 logits
EXECUTORS = ("ray", "local")
BOS_CHOICES = ("auto", "always", "never")  # a prompt's beginning-of-sequence token
RSA_SUBSETS = ("exemplars", "grid")  # the points of the RSA matrix (iclsft.rsa.points)
VARIANTS = ("holds", "broken")  # the implicit suite's evaluation sets: the hidden shortcut holds or not
DEVICES = ("cpu", "gpu")  # what the planner's rates are for (iclsft.graph.costs.RATES)
CHECKPOINTS_KEEP = ("all", "final", "none")  # full fine-tunes' checkpoints kept: every one, each training's last, none


_REGISTERED_ENGINES: list[str] = []  # iclsft.engine.base.register_engine adds to it


def engines() -> tuple[str, ...]:
    """Every engine name a spec may hold: the built-ins, then those registered (`register_engine`)."""
    return (*ENGINES, *_REGISTERED_ENGINES)


def engine_choices() -> tuple[str, ...]:
    """What --engine takes: auto, then `engines()`."""
    return ("auto", *engines())


def add_engine(name: str) -> None:
    if name not in engines():
        _REGISTERED_ENGINES.append(name)


def remove_engine(name: str) -> None:
    if name in _REGISTERED_ENGINES:
        _REGISTERED_ENGINES.remove(name)
