"""vLLM engine options: one builder for the in-process engine (`vllm.LLM(**kwargs)`) and for `serve`
(`vllm serve` flags), so that both start vLLM the same way. Needs no vLLM to run (unit-tested without it).

Defaults that matter on GPUs (notes/scale-facts.md): vLLM's own `max_model_len` is the model's whole
context (131k tokens for Llama-3.1) and it refuses to start when one such sequence does not fit in
the KV cache, although our longest prompt (K=200 per class) is about 4k tokens; so the default here
is the longest prompt plus the label tokens and the one generated token, at least MIN_MODEL_LEN,
rounded up to the cache block, and never above the model's context. dtype defaults to bf16 on GPUs
and fp32 on CPUs (CPU bf16 is slow without native support); a run's spec names its dtype explicitly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from iclsft.engine.reads import vllm_lora_rank
from iclsft.engine_spec import VLLMOptions

GPU_BLOCK_SIZE = 16  # vLLM's CUDA default
CPU_BLOCK_SIZE = 32  # the smallest cache block vLLM's CPU attention accepts (its default: 128)
CPU_KV_CACHE_GIB = 4  # vLLM's CPU default is half the machine's memory
MIN_MODEL_LEN = 2048  # a 2k-token sequence costs little KV memory and spares most engine rebuilds
LABEL_MARGIN = 8  # tokens beyond the longest prompt when label lengths are not known


def block_size_for(options: VLLMOptions, gpu: bool) -> int:
    return options.block_size or (GPU_BLOCK_SIZE if gpu else CPU_BLOCK_SIZE)


def model_context(model_path: str | Path) -> int | None:
    """The model's context length from its config.json, when it says (vLLM refuses a longer max_model_len)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    data = data.get("text_config", data)
    value = data.get("max_position_embeddings") or data.get("n_positions") or data.get("seq_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def default_max_model_len(longest_prompt: int, *, label_tokens: int | None = None, block_size: int,
                          model_context: int | None = None, floor: int = MIN_MODEL_LEN) -> int:
    """The longest prompt plus the label tokens read after it (a label of n tokens is read at prompt +
    its first n-1 tokens) and the one generated token, at least `floor`, rounded up to the cache block;
    capped at the model's context, which the prompt itself must fit."""
    if longest_prompt < 1:
        raise ValueError(f"longest prompt {longest_prompt!r} is not allowed: give a positive token count")
    margin = LABEL_MARGIN if label_tokens is None else label_tokens
    need = longest_prompt + margin + 1
    if model_context is not None and longest_prompt + max(margin - 1, 0) + 1 > model_context:
        raise ValueError(f"a prompt of {longest_prompt} tokens (plus {margin} label tokens) exceeds the model's "
                         f"context of {model_context} tokens: use fewer shots or a model with a longer context")
    length = block_size * math.ceil(max(need, floor) / block_size)
    return min(length, model_context) if model_context is not None else length


def resolve(options: VLLMOptions, *, gpu: bool, longest_prompt: int | None = None, label_tokens: int | None = None,
            model_context: int | None = None, floor: int = MIN_MODEL_LEN) -> VLLMOptions:
    """Options with the device- and prompt-dependent defaults filled in (max_model_len stays None when
    neither it nor the longest prompt is known)."""
    block = block_size_for(options, gpu)
    length = options.max_model_len
    if length is None and longest_prompt is not None:
        length = default_max_model_len(longest_prompt, label_tokens=label_tokens, block_size=block,
                                       model_context=model_context, floor=floor)
    return options.model_copy(update=dict(
        max_model_len=length, dtype=options.dtype or ("bfloat16" if gpu else "float32"),
        # each device's memory option is ignored on the other, so that one config serves both
        gpu_memory_utilization=options.gpu_memory_utilization if gpu else None,
        max_cpu_loras=options.max_cpu_loras or max(options.max_loras, 4), block_size=block,
        kv_cache_gib=None if gpu else (options.kv_cache_gib or CPU_KV_CACHE_GIB)))


def engine_kwargs(model: str, options: VLLMOptions, *, gpu: bool, lora_rank: int | None = None,
                  longest_prompt: int | None = None, label_tokens: int | None = None,
                  model_context: int | None = None, floor: int = MIN_MODEL_LEN, seed: int = 0) -> dict:
    """Keyword arguments for `vllm.LLM`: prefix caching on, adapters enabled when `lora_rank` is given."""
    o = resolve(options, gpu=gpu, longest_prompt=longest_prompt, label_tokens=label_tokens,
                model_context=model_context, floor=floor)
    kwargs: dict = {"model": model, "dtype": o.dtype, "enable_prefix_caching": True, "seed": seed}
    if options.block_size is not None or not gpu:
        # on GPUs the attention backend picks its block (16 on most; MLA backends need 64)
        kwargs["block_size"] = o.block_size
    kwargs.update(tensor_parallel_size=o.tensor_parallel_size, enforce_eager=o.enforce_eager)
    for name in ("max_model_len", "max_num_seqs", "gpu_memory_utilization"):
        if getattr(o, name) is not None:
            kwargs[name] = getattr(o, name)
    if o.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(o.kv_cache_gib * 2**30)
    if lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank), max_loras=o.max_loras,
                      max_cpu_loras=o.max_cpu_loras)
    return kwargs


# `vllm serve` spells these flags from the engine keyword arguments; the CPU KV cache size goes in
# the environment instead (VLLM_CPU_KVCACHE_SPACE), as `vllm serve` has no byte-size flag on 0.28.
_FLAGS = {"dtype": "--dtype", "block_size": "--block-size", "tensor_parallel_size": "--tensor-parallel-size",
          "max_model_len": "--max-model-len", "max_num_seqs": "--max-num-seqs",
          "gpu_memory_utilization": "--gpu-memory-utilization", "max_lora_rank": "--max-lora-rank",
          "max_loras": "--max-loras", "max_cpu_loras": "--max-cpu-loras"}
_SWITCHES = {"enable_prefix_caching": "--enable-prefix-caching", "enforce_eager": "--enforce-eager",
             "enable_lora": "--enable-lora"}


def serve_flags(options: VLLMOptions, *, gpu: bool, lora_rank: int | None = None, longest_prompt: int | None = None,
                label_tokens: int | None = None, model_context: int | None = None,
                given: tuple[str, ...] = ()) -> list[str]:
    """`vllm serve` flags for the same settings as `engine_kwargs`, leaving out any flag in `given`
    (the user's own arguments passed on to vLLM win)."""
    kwargs = engine_kwargs("", options, gpu=gpu, lora_rank=lora_rank, longest_prompt=longest_prompt,
                           label_tokens=label_tokens, model_context=model_context)
    taken = {a.split("=", 1)[0] for a in given if a.startswith("--")}
    out: list[str] = []
    for name, value in kwargs.items():
        if name in _SWITCHES and value and _SWITCHES[name] not in taken:
            out.append(_SWITCHES[name])
        elif name in _FLAGS and _FLAGS[name] not in taken:
            out += [_FLAGS[name], str(value)]
    return out
