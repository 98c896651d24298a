"""What the `vllm` engine adds to vLLM's worker (`worker_extension_cls`): swapping a full fine-tune's
weights into the running model, correctly on CPUs too.

vLLM reloads weights in place with `reload_weights(weights_path=DIR)` (0.16+, docs/vllm.md). On its CPU
backend that leaves one thing stale: a linear layer whose weight is shared with another module — the
output head of a model with tied embeddings (SmolLM2, Gemma 3) — keeps the packed copy of the OLD weight
that vLLM made at load time, because the checkpoint has no tensor of its own for it, so the reload never
processes that layer again. The scores were exactly "new body + old head" (../shared/notes/vllm-facts.md
§9). `swap_weights` reloads, then packs every such layer again from its (now new) weight.

This module runs inside vLLM's worker processes: it imports nothing of the package beyond itself.
"""

from __future__ import annotations


class WeightSwap:
    """Mixed into vLLM's worker class; called by name through `LLM.collective_rpc("swap_weights", ...)`."""

    def swap_weights(self, path: str) -> int:
        """Load the weights in the model directory `path` into the live model; returns how many shared-weight
        layers were packed again (0 off CPUs, where layers read their weight directly)."""
        self.reload_weights(weights_path=path)  # vLLM's Worker method: resets LoRA and encoder caches
        return repack_shared_weights(self.model_runner.get_model())


def repack_shared_weights(model) -> int:
    """On CPUs, rebuild the packed GEMM copy of every layer that keeps its weight (vLLM packs and drops
    the weight of ordinary linear layers; embeddings and tied output heads keep theirs) from that weight."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    count = 0
    for module in model.modules():
        method, weight = getattr(module, "quant_method", None), getattr(module, "weight", None)
        if (hasattr(module, "cpu_linear") and method is not None and isinstance(weight, torch.Tensor)
                and weight.ndim == 2 and weight.numel() > 0):
            method.process_weights_after_loading(module)
            count += 1
    return count
