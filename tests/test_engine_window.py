"""The hf engine on sliding-window models and on large-model plumbing (issue 17 items 3 and 5).

Sliding windows: tiny random models with the real SmolLM2 vocabulary and a window far shorter than
the prompt (Mistral-style: every layer windowed; Gemma3 and Qwen2: `layer_types` mixing sliding and
full layers). Every engine path (tree and mask attention, prefix reuse, packed batches, a merged
LoRA adapter) is checked against a plain forward of the whole prompt through the model's own
attention (`naive_score`: no custom mask, so transformers applies the window itself). Each case
also checks that ignoring the window moves the scores by whole nats, so the test can fail.

Large models: the CUDA token budget against a brute-force search of the same memory model, with
made-up memory numbers; the device_map option's path to `from_pretrained`.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

from iclsft.engine import budget, windows
from iclsft.engine.hf import HFEngine
from iclsft.engine.packing import pack
from iclsft.engine.reference import naive_score
from iclsft.spec import TaskSpec
from iclsft.tasks.linear2d import exemplars

TOL = 1e-4  # fp32, absolute on log-probs
NAMES = (" Bazooka", " Bazel")  # 4 and 3 tokens sharing two: trees of depth up to 8 after a 6-token query
POINTS = [(1, 23), (12, 3), (12, 30), (12, 31), (50, 5), (99, 99), (7, 70), (7, 7)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(tok, shots: int) -> list[int]:
    """The ICL text of `shots` exemplars per class, tokenized whole (K=4: 83 tokens)."""
    ex = exemplars(TaskSpec(angle=30.0), 0, shots)
    text = "".join(f"{a} {b} ->{NAMES[int(t)]}\n" for a, b, t in zip(ex["n1"], ex["n2"], ex["truth"]))
    return tok.encode(text)


@pytest.fixture(scope="module")
def ids(smollm_tokenizer):
    tok = smollm_tokenizer
    return dict(prefix={k: _prompt(tok, k) for k in (2, 4)}, queries=[tok.encode(f"{a} {b} ->") for a, b in POINTS],
                labels=[tok.encode(n) for n in NAMES], vocab=len(tok))


def _small(**extra) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=8192, initializer_range=0.2, **extra)


def make_model(kind: str, vocab: int, window: int, **extra):
    """A random 2-4 layer model of family `kind` whose window is `window` tokens (`extra`: config fields)."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if kind == "mistral":  # every layer windowed
        config, cls = MistralConfig(vocab_size=vocab, num_hidden_layers=2, sliding_window=window,
                                    tie_word_embeddings=True, **_small()), MistralForCausalLM
    elif kind == "gemma3":  # local, global, local, global
        config = Gemma3TextConfig(vocab_size=vocab, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16,
                                  sliding_window=window, layer_types=["sliding_attention", "full_attention"] * 2,
                                  **_small(**extra))
        cls = Gemma3ForCausalLM
    elif kind == "qwen2":  # layer 0 full, layers 1-2 windowed (max_window_layers)
        config = Qwen2Config(vocab_size=vocab, num_hidden_layers=3, use_sliding_window=True, sliding_window=window,
                             max_window_layers=1, tie_word_embeddings=True, **_small())
        cls = Qwen2ForCausalLM
    else:
        raise ValueError(kind)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).eval()


def _unwindowed(model):
    """The same weights with a window longer than any prompt (what the engine computed before windows were
    built into its masks)."""
    other = copy.deepcopy(model)
    other.config.sliding_window = 10**6
    for layer in other.model.layers:  # layers read their window at construction
        if getattr(layer.self_attn, "sliding_window", None) is not None:
            layer.self_attn.sliding_window = 10**6
    return other


# -- the window rule ---------------------------------------------------------------------------


def test_layer_windows_per_family():
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    assert windows.layer_windows(MistralConfig(num_hidden_layers=3, sliding_window=16)) == [16, 16, 16]
    assert windows.layer_windows(MistralConfig(num_hidden_layers=2, sliding_window=None)) == [None, None]
    gemma = Gemma3TextConfig(num_hidden_layers=4, sliding_window=8,
                             layer_types=["sliding_attention", "full_attention"] * 2)
    assert windows.layer_windows(gemma) == [8, None, 8, None]
    qwen = Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert windows.layer_windows(qwen) == [None, 8, 8]
    assert windows.layer_windows(Qwen2Config(num_hidden_layers=2)) == [None, None]  # use_sliding_window off
    assert windows.layer_windows(LlamaConfig(num_hidden_layers=2)) == [None, None]


def test_unknown_layer_type_is_refused_by_name():
    config = types.SimpleNamespace(num_hidden_layers=2, sliding_window=8,
                                   layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(ValueError, match="layer 1 has attention type 'chunked_attention'"):
        windows.layer_windows(config)


def test_model_windows_read_from_the_models_own_masks(ids):
    """The probe agrees with the config where the model uses its window, and finds none where the
    model ignores a window its config carries (a Llama config with a stray sliding_window)."""
    from conftest import make_tiny_llama

    assert windows.model_windows(make_model("mistral", ids["vocab"], 16)) == [16, 16]
    assert windows.model_windows(make_model("gemma3", ids["vocab"], 16)) == [16, None, 16, None]
    assert windows.model_windows(make_model("qwen2", ids["vocab"], 8)) == [None, 8, 8]
    llama = make_tiny_llama(ids["vocab"])
    llama.config.sliding_window = 4
    assert windows.layer_windows(llama.config) == [4, 4]  # what the config alone would say
    assert windows.model_windows(llama) == [None, None]
    assert llama.config.sliding_window == 4 and "forward" not in vars(llama.model.layers[0])  # all put back
    engine = HFEngine(llama, token_budget=16, attention="mask", progress=False)
    prefix = ids["prefix"][2]
    got = engine.score(prefix, ids["queries"][:3], ids["labels"])
    assert np.abs(got - naive_score(llama, prefix, ids["queries"][:3], ids["labels"])).max() < TOL


def test_band_width_of_hand_made_masks():
    n = 6
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    causal = (k <= q)[None, None]
    band = ((k <= q) & (k > q - 3))[None, None]
    chunked = ((k <= q) & (k // 3 == q // 3))[None, None]
    additive = torch.where(band, 0.0, torch.finfo(torch.float32).min)
    assert windows._band_width(None, n) is None and windows._band_width(causal, n) is None
    assert windows._band_width(band, n) == 3 and windows._band_width(additive, n) == 3
    assert windows._band_width(chunked, n) == -1 and windows._band_width(causal[..., :4], n) == -1


@pytest.mark.parametrize("window", [None, 1, 3, 5, 12, 100])
def test_tree_mask_against_positions(window):
    """Every (node, key) pair by hand: positions along the flat sequence the naive forward sees."""
    queries = [[5, 6, 7], [5, 6, 8, 9], [5, 10], [11, 12, 13, 14, 15]]
    (batch,) = pack(queries, [[1, 2, 3], [4]], token_budget=100)
    prefix_len = 9
    got = windows.tree_mask(prefix_len, batch.depth, batch.ancestor_mask(), window).numpy()
    n = len(batch)
    expected = np.zeros((n, prefix_len + n), dtype=bool)
    for i in range(n):
        chain, node = set(), i
        while node >= 0:
            chain.add(node)
            node = batch.parent[node]
        q = prefix_len + batch.depth[i]
        for j in range(prefix_len):
            expected[i, j] = window is None or j > q - window
        for k in chain:
            expected[i, prefix_len + k] = window is None or prefix_len + batch.depth[k] > q - window
    assert np.array_equal(got, expected)
    assert max(batch.depth) == 6  # deep enough that windows 1-5 cut ancestors


# -- the engine against a plain forward -----------------------------------------------------------

MODELS = [("mistral", 16), ("mistral", 4), ("gemma3", 16), ("qwen2", 8)]


@pytest.fixture(scope="module")
def models(ids):
    return {(kind, w): make_model(kind, ids["vocab"], w) for kind, w in MODELS}


@pytest.mark.parametrize("kind,window", MODELS)
@pytest.mark.parametrize("attention", ["tree", "mask"])
def test_windowed_engine_equals_naive_forward(models, ids, kind, window, attention):
    """K=4 prefix (83 tokens, 5-20x the window), 8 queries in 16-node batches, then the K=2 prefix (a
    free slice of the cached one) and no prefix at all (the window cuts inside the query tree)."""
    model = models[(kind, window)]
    engine = HFEngine(model, token_budget=16, attention=attention, progress=False)
    assert len(ids["prefix"][4]) > 5 * window and len(pack(ids["queries"], ids["labels"], 16)) > 2
    for prefix in (ids["prefix"][4], ids["prefix"][2], []):
        expected = naive_score(model, prefix, ids["queries"], ids["labels"])
        got = engine.score(prefix, ids["queries"], ids["labels"])
        assert np.abs(got - expected).max() < TOL
    full = naive_score(_unwindowed(model), ids["prefix"][4], ids["queries"], ids["labels"])
    assert np.abs(full - naive_score(model, ids["prefix"][4], ids["queries"], ids["labels"])).max() > 0.5


def test_windowed_prefix_extended_in_chunks(models, ids):
    """The cached K=2 prefix extended to K=4 in 16-token chunks through the model's own masks."""
    model = models[("mistral", 16)]
    engine = HFEngine(model, token_budget=16, progress=False)
    engine.score(ids["prefix"][2], ids["queries"][:2], ids["labels"])
    got = engine.score(ids["prefix"][4], ids["queries"], ids["labels"])
    assert np.abs(got - naive_score(model, ids["prefix"][4], ids["queries"], ids["labels"])).max() < TOL


def test_windowed_lora_adapter_merged_and_not(models, ids, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = models[("mistral", 16)]
    torch.manual_seed(1)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                          target_modules=["q_proj", "v_proj", "o_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    prefix = ids["prefix"][4]
    expected = naive_score(reference, prefix, ids["queries"], ids["labels"])
    assert np.abs(expected - naive_score(base, prefix, ids["queries"], ids["labels"])).max() > 0.1
    for merge in (True, False):
        engine = HFEngine(copy.deepcopy(base), token_budget=16, merge_lora=merge, progress=False)
        got = engine.score(prefix, ids["queries"], ids["labels"], adapter=str(tmp_path / "adapter"))
        assert np.abs(got - expected).max() < TOL


def test_tree_attention_refuses_a_window_it_did_not_read(models, ids):
    engine = HFEngine(models[("mistral", 16)], token_budget=16, attention="tree", progress=False)
    engine.windows = [None, None]  # as if the config said full attention
    with pytest.raises(NotImplementedError, match="layer 0 asks for sliding window 16"):
        engine.score(ids["prefix"][2], ids["queries"][:1], ids["labels"])


def test_engine_refuses_an_attention_type_it_does_not_implement(ids):
    model = make_model("gemma3", ids["vocab"], 16)
    model.config.layer_types = ["sliding_attention", "chunked_attention"] * 2
    with pytest.raises(ValueError, match="layer 1 has attention type 'chunked_attention'"):
        HFEngine(model, progress=False)


# -- token budget ----------------------------------------------------------------------------------

SHAPE = dict(element_bytes=2, hidden=1000, intermediate=4000, layers=10, kv_dim=100, vocab=10_000, prefix_tokens=1000)


def _fits(n: int, free: int) -> bool:
    """The memory model written out term by term (bytes), for a brute-force search."""
    s = 2
    per_node = (s * (8 * 1000 + 4 * 4000)  # one layer's activations
                + s * 2 * 10 * 100  # the batch's keys and values, all layers
                + (s + 8) * 10_000  # one output row
                + (s + 3) * 1000)  # mask columns over the prefix
    quadratic = (s + 3) * n * n  # mask columns over the nodes
    fixed = s * 2 * 10 * 100 * 1000  # the cache's copy of the prefix
    return quadratic + per_node * n + fixed <= budget.FREE_SHARE * free


@pytest.mark.parametrize("free", [10**7, 2 * 10**8, 212_513_500, 212_513_700, 10**9, 10**12])
def test_cuda_budget_against_brute_force(free):
    got = budget.cuda_budget(free_bytes=free, **SHAPE)
    fitting = [n for n in range(budget.MIN_BUDGET, budget.MAX_BUDGET + 1, 64) if _fits(n, free)]
    assert got == (max(fitting) if fitting else budget.MIN_BUDGET)


def test_cuda_budget_boundary_by_hand():
    # n = 1024 needs 5 * 1024**2 + 157,000 * 1024 + 4,000,000 = 170,010,880 bytes = 0.8 * 212,513,600
    assert budget.cuda_budget(free_bytes=212_513_700, **SHAPE) == 1024
    assert budget.cuda_budget(free_bytes=212_513_500, **SHAPE) == 960
    assert budget.cuda_budget(free_bytes=10**12, **SHAPE) == budget.MAX_BUDGET
    assert budget.cuda_budget(free_bytes=1000, **SHAPE) == budget.MIN_BUDGET


class _FakeParam:
    def __init__(self, device: str):
        self.device = torch.device(device)

    def element_size(self) -> int:
        return 2


def test_auto_budget_uses_the_fullest_gpu(monkeypatch):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=1000, intermediate_size=4000, num_hidden_layers=10, num_attention_heads=10,
                         num_key_value_heads=1, vocab_size=10_000)
    model = types.SimpleNamespace(config=config, parameters=lambda: iter([_FakeParam("cuda:0"), _FakeParam("cuda:1")]))
    free = {0: 5 * 10**8, 1: 2 * 10**8}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[torch.device(d).index], 10**10))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * 10**6)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 10**6)
    got = budget.auto_token_budget(model)
    assert got == budget.cuda_budget(free_bytes=2 * 10**8 + 2 * 10**6, element_bytes=2, hidden=1000, intermediate=4000,
                                     layers=10, kv_dim=100, vocab=10_000)
    # at P = 8,192, n = 640 needs 158,310,400 bytes <= 0.8 x 202,000,000; n = 704 does not fit
    assert got == 640
    assert budget.model_shape(config)["kv_dim"] == 100


def test_auto_budget_on_cpu_is_1024(tiny_model):
    assert budget.auto_token_budget(tiny_model) == budget.CPU_BUDGET == 1024
    assert HFEngine(tiny_model, progress=False).token_budget == 1024


# -- device_map ------------------------------------------------------------------------------------


def test_device_map_reaches_from_pretrained_with_a_memory_plan(monkeypatch, tmp_path):
    import transformers

    from iclsft.models import ModelRef, load_model

    seen = {}

    class _Model:
        def eval(self):
            return self

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return _Model()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path: "tokenizer")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: ({0: 80 * 2**30, 1: 40 * 2**30}[d], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 0)
    load_model(ModelRef("m", tmp_path, ""), "bfloat16", device_map="auto")
    assert seen["device_map"] == "auto" and seen["dtype"] == torch.bfloat16
    assert seen["max_memory"] == {0: int(0.8 * 80 * 2**30), 1: int(0.8 * 40 * 2**30)}
    seen.clear()
    load_model(ModelRef("m", tmp_path, ""), "bfloat16", device_map="cuda:1")
    assert seen["device_map"] == "cuda:1" and "max_memory" not in seen  # one device: no plan
    with pytest.raises(ValueError, match="device_map 'gpu' is not one of auto"):
        load_model(ModelRef("m", tmp_path, ""), device_map="gpu")


def test_device_map_cpu_loads_and_scores(tiny_model_dir, ids):
    from iclsft.models import ModelRef, load_model

    model, _ = load_model(ModelRef("tiny", tiny_model_dir, ""), "float32", device_map="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    engine = HFEngine(model, token_budget=32, progress=False)
    assert engine.device == model.get_input_embeddings().weight.device
    prefix = ids["prefix"][2]
    got = engine.score(prefix, ids["queries"][:3], ids["labels"])
    assert np.abs(got - naive_score(model, prefix, ids["queries"][:3], ids["labels"])).max() < TOL


def test_engine_spec_device_map_option(monkeypatch, tmp_path):
    import pydantic

    from iclsft.engine import base
    from iclsft.spec import EngineSpec

    assert EngineSpec().hf.token_budget is None and EngineSpec().hf.device_map is None
    with pytest.raises(pydantic.ValidationError, match="device_map"):
        EngineSpec.of("hf", device_map="gpu0")
    seen = {}

    def fake_load(ref, dtype, device_map=None):
        seen["device_map"] = device_map
        raise RuntimeError("stop here")

    monkeypatch.setattr("iclsft.models.load_model", fake_load)
    with pytest.raises(RuntimeError, match="stop here"):
        base.open_engine(EngineSpec.of("hf", device_map="balanced"), tmp_path)
    assert seen["device_map"] == "balanced"


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Independent reference: the model's own forward (its own sliding-window masks), one token at a time."""
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kind,window", MODELS)
def test_generation_applies_the_window_past_it(models, ids, kind, window):
    """Greedy generation with a prompt 2-5x the window and answers that run on past it: queries sharing
    their first tokens (one tree), the model's own greedy loop as reference, and the same weights without
    the window generating something else (so the test can fail)."""
    # Gemma's tied head over its scaled embeddings repeats the last token whatever it attends to
    model = (make_model(kind, ids["vocab"], window, tie_word_embeddings=False) if kind == "gemma3"
             else models[(kind, window)])
    engine = HFEngine(model, token_budget=64, progress=False)
    prompt = ids["prefix"][4]
    prefix, queries, steps = prompt[:3 * window], [ids["queries"][i] for i in (0, 1, 2, 5)], window + 4
    got = engine.generate(prefix, queries, stop_ids=[], max_new_tokens=steps)
    expected = [_greedy(model, prefix + q, steps) for q in queries]
    assert got == expected
    ignoring = [_greedy(_unwindowed(model), prefix + q, steps) for q in queries]
    assert ignoring != expected
    assert engine.generate([], queries[:1], stop_ids=[], max_new_tokens=steps) == [_greedy(model, queries[0], steps)]
