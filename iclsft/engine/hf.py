"""The `hf` engine: transformers in-process, prefix computed once, queries packed as a token tree.

How one `score` call works:
1. The prefix's KV cache is computed once and kept, in blocks of 256 tokens at fixed positions. A
   later prefix that shares its first tokens (the ICL prompt at a smaller K is a token prefix of the
   one at a larger K) reuses the whole blocks they share and computes the rest; the same prefix again
   is reused whole. A prefix's KV, and every score after it, is therefore the same to the last bit
   whatever prompt the engine scored before (a resumed run, or another scoring order, on a scorer).
2. Queries are sorted and packed into one sequence per forward pass, as a trie (engine/packing.py):
   queries that start with the same tokens (all queries with the same n1 share "n1 ") share those
   nodes, and each label's tokens but its last hang below the query's last node. A node sees the
   whole prefix and its own ancestors only; positions continue after the prefix by depth. With no
   sharing this is the block-diagonal packing of independent queries.
3. Attention (`attention="tree"`, the default on CPUs): prefix and tree parts are computed apart
   and merged by their log-sum-exps (engine/tree_attention.py), so no node pair outside a path is
   ever scored; `attention="mask"` is one SDPA call over a dense n x (prefix + n) boolean mask.
   Both apply the model's sliding windows per layer (engine/windows.py): a custom mask replaces the
   model's own, window included.
4. An adapter's LoRA product is added into its base weights for the call (`merge_lora`).
5. The output head runs only at the rows whose next token is a label token, on the full vocabulary
   (the log-softmax needs it), in fp32.
6. On CPUs the packed batches may run on `workers` Python threads at once, torch's threads shared out
   among them (2 cores, workers=2: two batches at one thread each). On a quiet machine one worker at
   all threads is as fast (0.96-0.99x for two, docs/benchmarks/engine_profile.md), so it is the default;
   where another process takes a core, two workers were 1.3-1.9x faster (docs/throughput.md): one is
   slowed instead of both threads of every matmul waiting on the busy core. Each batch is computed
   whole by one worker at the same torch thread count whichever worker it is, so the scores do not
   depend on the scheduling (equal to the last bit to one worker's, measured).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from iclsft.cpu import warn_emulated_bf16
from iclsft.engine import generate, tree_attention, windows
from iclsft.engine.budget import auto_token_budget, model_devices
from iclsft.engine.contract import Engine, check_generate_args, check_model_dir
from iclsft.engine.packing import PackedBatch, pack
from iclsft.engine.prefix_kv import KV, PREFIX_BLOCK, as_cache, cache_keyword, prefix_kv
from iclsft.heap import heap_kept
from iclsft.names import PREFIX_KERNELS

logger = logging.getLogger(__name__)

ATTENTION = ("auto", "tree", "mask")


class HFEngine(Engine):
    """Packed, prefix-sharing label scoring and greedy generation on a transformers causal LM
    (optionally with peft adapters)."""

    name = "hf"

    def __init__(self, model, *, token_budget: int | None = None, progress: bool = True,
                 threads: int | None = None, attention: str = "auto", merge_lora: bool = True,
                 source: str | Path | None = None, workers: int | None = None, prefix_kernel: str = "flash"):
        """`token_budget`: tree nodes per packed forward; None chooses it for the device (engine/budget.py:
        1,024 on CPUs, from free memory on CUDA). `attention`: "tree" (prefix and tree parts apart, no mask:
        engine/tree_attention.py), "mask" (one SDPA call with a dense boolean mask), "auto" (tree where
        supported: transformers' attention interface, CPU). `merge_lora`: score an adapter with its LoRA
        product added into the base weights for the call (one matmul per projection instead of three; the
        original weights are put back untouched). The model may be spread over devices (`device_map`):
        inputs go to its embedding's device. `source`: the directory the model was loaded from, for
        `check_model` (default: the model's own `name_or_path`). `workers`: packed batches scored at once
        on a CPU, each at torch's threads / workers (None: 1; on GPUs always 1). `prefix_kernel`: the tree
        path's prefix attention, "flash" or "gemm" (bf16 GEMMs around an fp32 softmax: faster in bf16 on CPUs
        with native bf16, its q.k products rounded to bf16; tree_attention.prefix_attention)."""
        if prefix_kernel not in PREFIX_KERNELS:
            raise ValueError(f"prefix_kernel {prefix_kernel!r} is not one of {', '.join(PREFIX_KERNELS)}")
        if attention not in ATTENTION:
            raise ValueError(f"attention {attention!r} is not one of {', '.join(ATTENTION)}")
        if threads:
            torch.set_num_threads(threads)
        self.base = model
        self.model = model
        self.progress = progress
        self.merge_lora = merge_lora
        self.device = model.get_input_embeddings().weight.device  # the first layer's, under a device_map
        # the rows to read are indexed on the last layer's device: a CPU index works on any device
        self.rows_device = self.device if len(model_devices(model)) == 1 else torch.device("cpu")
        self.windows = windows.model_windows(model)  # what the model's own masks do, per layer
        self.token_budget = auto_token_budget(model) if token_budget is None else token_budget
        if attention == "auto":
            attention = "tree" if tree_attention.supported(model) else "mask"
        elif attention == "tree" and not tree_attention.supported(model):
            raise ValueError("attention='tree' needs a model on the CPU that uses transformers' attention interface")
        self.attention = attention
        if self.device.type == "cpu" and any(p.dtype == torch.bfloat16 for p in model.parameters()):
            warn_emulated_bf16("bf16 scoring", "4-8x slower than float32", "score in float32 (--dtype float32)",
                               logger)
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers or 1
        self.prefix_kernel = prefix_kernel
        self.source = source if source is not None else (getattr(model, "name_or_path", "") or None)
        self.cache_keyword = cache_keyword(model)
        # adapter key -> (prefix tokens, per-layer (keys, values) of that prefix)
        self._prefix_kv: dict[str | None, tuple[list[int], KV]] = {}

    def check_model(self, path: str | Path, fingerprint: str) -> None:
        check_model_dir(self.name, self.source, path, fingerprint)

    def close(self) -> None:
        """Drop the model, its adapters and the prefix caches (their memory returns once no one else
        holds the model)."""
        self._prefix_kv.clear()
        self.model = self.base = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    can_load_weights = True

    def load_weights(self, path: str | Path) -> None:
        """Copy the weights of the full fine-tune saved in `path` (safetensors, as `save_pretrained`
        writes them) into the live model, cast to its dtype; loaded adapters and the prefix caches are
        dropped. Every parameter must be in the files, except those tied to one that is (the output head
        to the embeddings)."""
        self._require_open()
        from safetensors.torch import load_file

        if self.model is not self.base:
            # LoRA adapters still loaded (a sweep's scorer keeps its recent ones): they belong to the base
            # weights this swap replaces, so they are taken out; one used again is read from its directory
            self.base = self.model.unload()
            self.model = self.base
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {path}")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        params = dict(self.base.named_parameters(remove_duplicate=False))
        unknown = sorted(set(state) - set(params) - set(dict(self.base.named_buffers())))
        loaded = {id(params[k]) for k in state if k in params}
        untouched = sorted(k for k, p in params.items() if k not in state and id(p) not in loaded)
        if unknown or untouched:
            raise ValueError(f"weights in {path} do not fit the engine's model (unknown: {unknown[:3]}, missing: "
                             f"{untouched[:3]}): a full fine-tune swaps only into its own base architecture")
        with torch.no_grad():
            self.base.load_state_dict(state, strict=False)
        self._prefix_kv.clear()
        self.source = path

    def _require_open(self) -> None:
        if self.model is None:
            raise ValueError("this hf engine is closed: open a new one (open_engine)")

    # -- adapters ---------------------------------------------------------------------------
    def _activate(self, adapter: str | None) -> str | None:
        """Make `adapter` (a peft adapter directory) the active one; None means the base model."""
        self._require_open()
        if adapter is None:
            return None
        try:
            from peft import PeftModel
        except ImportError as e:
            raise ImportError("scoring adapters needs peft: pip install 'iclsft-eval[sft]'") from e
        key = self._key(adapter)
        with warnings.catch_warnings():
            # peft reads a transformers property that warns about its own deprecation on every load
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.base, adapter, adapter_name=key)
            elif key not in self.model.peft_config:
                self.model.load_adapter(adapter, adapter_name=key)
        self.model.set_adapter(key)
        self.model.eval()
        return key

    @staticmethod
    def _key(adapter: str) -> str:
        return "a" + hashlib.sha1(str(adapter).encode()).hexdigest()[:12]

    def release(self, adapter: str | None) -> None:
        """Forget an adapter (its weights and its prefix cache): sweeps score hundreds of them."""
        if adapter is None or self.model is None:
            return
        key = self._key(adapter)
        self._prefix_kv.pop(key, None)
        if self.model is self.base or key not in self.model.peft_config:
            return
        if len(self.model.peft_config) == 1:
            self.base = self.model.unload()  # takes the LoRA layers out again; the base is untouched
            self.model = self.base
        else:
            self.model.delete_adapter(key)

    def _context(self, key: str | None):
        if key is None and self.model is not self.base:
            return self.model.disable_adapter()
        if key is not None and self.merge_lora:
            return self._merged(key)
        return nullcontext()

    @contextmanager
    def _merged(self, key: str):
        """The adapter `key` folded into its base layers' weights, its LoRA branch switched off.

        x(W + sBA) instead of xW + s(xA)B: one matmul per projection (the rank-r branch is three thin
        ones), equal up to float rounding. The base layers get new weight tensors for the duration and
        their own back afterwards, so the base weights never drift (unlike merge/unmerge in place).
        Only plain LoRA linear layers; anything else (DoRA, LoRA bias, other layer types) is scored
        unmerged."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer) and key in m.lora_A]
        plain = all(type(m) is LoraLinear and not m.use_dora.get(key) and not getattr(m, "lora_bias", {}).get(key)
                    and not m.merged for m in layers)
        if not layers or not plain:
            yield
            return
        swapped = []
        try:
            for m in layers:
                base = m.get_base_layer()
                swapped.append((base, base.weight))
                merged = base.weight + m.get_delta_weight(key).to(base.weight.dtype)
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
            with self.model.disable_adapter():
                yield
        finally:
            for base, weight in swapped:
                base.weight = weight

    # -- prefix -----------------------------------------------------------------------------
    def prefix_kv(self, prefix: Sequence[int], key: str | None = None) -> KV:
        """Per-layer KV of `prefix`, computing only what is not shared with the cached prefix.

        Full cache layers, never the config's sliding-window layers: those keep only the last
        window - 1 tokens, and the engine slices the prefix per layer (the model's own masks still
        apply the window when it computes the prefix; the engine's masks do it for the batches)."""
        self._require_open()
        prefix = [int(t) for t in prefix]
        cached = self._prefix_kv.get(key)
        kv = prefix_kv(self.model, prefix, reuse=cached, block=PREFIX_BLOCK, logits_to_keep=1)
        if kv and (cached is None or list(cached[0][: len(prefix)]) != prefix):
            self._prefix_kv[key] = (prefix, kv)  # longer than, or diverging from, the cached prefix
        return kv

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix: the next call computes its prefix from scratch (benchmarks time it)."""
        self._prefix_kv.clear()

    # -- scoring ----------------------------------------------------------------------------
    @torch.inference_mode()
    def score(
        self,
        prefix: Sequence[int],
        queries: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        adapter: str | None = None,
    ) -> np.ndarray:
        if not labels or any(len(label) == 0 for label in labels):
            raise ValueError("every label needs at least one token")
        key = self._activate(adapter)
        out = np.full((len(queries), len(labels)), np.nan)
        with self._context(key), heap_kept():  # each batch's activations reuse the last batch's memory
            kv = self.prefix_kv(prefix, key)
            batches = pack(queries, labels, self.token_budget)
            bar = _progress(len(queries), self.progress and len(queries) >= 2000)
            tree = tree_attention.activated(self.base.config) if self.attention == "tree" else nullcontext()

            def one(batch: PackedBatch) -> int:
                with torch.inference_mode():  # thread-local: each worker enters it
                    self._score_batch(batch, kv, len(prefix), out)
                return len(batch.reads)

            with tree, self._batch_workers(len(batches)) as workers, (
                    ThreadPoolExecutor(workers, thread_name_prefix="iclsft-batch") if workers > 1 else nullcontext()
            ) as pool:
                for n in (pool.map(one, batches) if pool is not None else map(one, batches)):
                    bar.update(n)
            bar.close()
        return out

    @contextmanager
    def _batch_workers(self, batches: int) -> Iterator[int]:
        """How many batches run at once; torch's threads are shared out among them for the duration."""
        threads = torch.get_num_threads()
        cpu = self.device.type == "cpu"
        workers = max(1, min(self.workers, batches, threads)) if cpu else 1
        if workers > 1:
            torch.set_num_threads(max(1, threads // workers))
        try:
            yield workers
        finally:
            if workers > 1:
                torch.set_num_threads(threads)

    # -- generation -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prefix: Sequence[int], queries: Sequence[Sequence[int]], *, stop_ids: Sequence[int],
                 max_new_tokens: int, adapter: str | None = None) -> list[list[int]]:
        """Greedy continuations, queries packed as a token tree after the once-computed prefix
        (engine/generate.py)."""
        check_generate_args(self.name, queries, max_new_tokens)
        self._require_open()
        if not queries:
            return []
        key = self._activate(adapter)
        stop = torch.tensor(sorted({int(t) for t in stop_ids}), dtype=torch.long)
        out: list[list[int]] = [[] for _ in queries]
        with self._context(key):
            kv = self.prefix_kv(prefix, key)
            for batch in pack(queries, [[0]], self.token_budget):  # one 1-token "label": paths = queries
                index = [q for q, _ in batch.reads]
                last = [per_label[0][0][0] for _, per_label in batch.reads]
                new = generate.decode(self.model, kv, len(prefix), batch.tokens, batch.depth, batch.ancestor_mask(),
                                      last, stop, max_new_tokens, device=self.device, keyword=self.cache_keyword,
                                      layer_windows=self.windows, config=self.base.config)
                for q, tokens in zip(index, new):
                    out[q] = tokens
        return out

    def _score_batch(self, batch: PackedBatch, kv, prefix_len: int, out: np.ndarray) -> None:
        rows = sorted({row for _, per_label in batch.reads for pairs in per_label for row, _ in pairs})
        where = {row: i for i, row in enumerate(rows)}
        inputs = dict(input_ids=torch.tensor([batch.tokens], device=self.device),
                      position_ids=torch.tensor([batch.depth], device=self.device) + prefix_len,
                      logits_to_keep=torch.tensor(rows, device=self.rows_device))
        if self.attention == "tree":  # routed through tree_attention by `score` (for every batch at once)
            context = tree_attention.TreeContext.build(kv, batch.parent, self.device, self.windows,
                                                       self.prefix_kernel)
            output = self.model(**inputs, use_cache=False, iclsft_tree=context)
        else:
            mask = windows.model_masks(self.base.config, self.windows, prefix_len, batch.depth, batch.ancestor_mask(),
                                       self.device)
            output = self.model(**inputs, attention_mask=mask, use_cache=bool(prefix_len),
                                **{self.cache_keyword: as_cache(kv) if prefix_len else None})
        logits = output.logits[0].float()
        row_idx, tok_idx, owners = [], [], []
        for q, per_label in batch.reads:
            for j, pairs in enumerate(per_label):
                for row, tok in pairs:
                    row_idx.append(where[row])
                    tok_idx.append(tok)
                    owners.append((q, j))
        # log_softmax over the whole row, then a gather: on CPUs faster than logsumexp (one fused pass)
        logprobs = torch.log_softmax(logits, dim=-1)  # on the output head's device (the last, under a device_map)
        at = logprobs.device
        values = logprobs[torch.tensor(row_idx, device=at), torch.tensor(tok_idx, device=at)].double().cpu().numpy()
        sums: dict[tuple[int, int], float] = {}
        for owner, value in zip(owners, values):
            sums[owner] = sums.get(owner, 0.0) + value
        for (q, j), value in sums.items():
            out[q, j] = value


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="q", desc="scoring", leave=False)
