"""The one source of the names a user types: methods and engines (task names come from the task
registry, `iclsft.tasks.registry.names(study)`)."""

SFT_METHODS = ("lora", "full", "full-frozen-unembed")  # the 2D study's fine-tuning methods (SPEC §6)
METHODS = ("icl", *SFT_METHODS)
IMPLICIT_METHODS = ("icl", "lora", "full")  # the implicit suite's arms (SPEC §8)
RECIPES = ("ours", "original")  # the implicit suite's fine-tuning recipes
ENGINES = ("hf", "vllm", "vllm-server")
ENGINE_CHOICES = ("auto", *ENGINES)  # "auto": vllm on a GPU where vLLM is installed, else hf
DTYPES = ("float32", "bfloat16")
CHECKPOINTS_KEEP = ("all", "final", "none")  # full fine-tunes' checkpoints kept: every one, each training's last, none
