"""The planner's and simulator's view of a sweep (iclsft.graph.simulate, iclsft.sweep.plan): the work graph
of a small config counted by hand, the default split of scorers and trainers, and the CLI's lines."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from iclsft.cli import main
from iclsft.graph.costs import full_checkpoint_bytes, model_shape, swap_seconds
from iclsft.graph.resources import Resources, resolve
from iclsft.graph.simulate import simulate
from iclsft.spec import TaskSpec
from iclsft.sweep import SweepConfig
from iclsft.sweep.plan import simulation_works
from iclsft.tasks import linear2d

SFT = {"epochs": 2, "min_steps": 0, "batch_size": 8}  # K = 1, 2: 2K <= 8, one batch per epoch, 2 steps

# The tiny Llama (hidden 64, 4 heads of 16, k and v 32 wide, MLP 128, 2 layers, vocab 49,152, tied) against
# SmolLM2-135M (hidden 576, 9 heads of 64, k and v 192 wide, MLP 1,536, 30 layers, vocab 49,152), whose rates
# the costs are: decoder linears per layer, the output head, attention width, parameters
TINY = {"body": 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128), "head": 64 * 49_152, "attention": 2 * 4 * 16}
SMOL = {"body": 30 * (576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536), "head": 576 * 49_152,
        "attention": 30 * 9 * 64}
TINY_PARAMS = 49_152 * 64 + 2 * ((64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 128 + 2 * 64) + 64
SMOL_PARAMS = 49_152 * 576 + 30 * (SMOL["body"] // 30 + 2 * 576) + 576
# a scored query: 6 tokens through the body, 1.5 rows of the head; a training token: both
QUERY = (6 * TINY["body"] + 1.5 * TINY["head"]) / (6 * SMOL["body"] + 1.5 * SMOL["head"])
TRAIN = (TINY["body"] + TINY["head"]) / (SMOL["body"] + SMOL["head"])
PREFIX = TINY["attention"] / SMOL["attention"]
LOAD = TINY_PARAMS / SMOL_PARAMS


@pytest.fixture()
def config(tiny_model_dir, tmp_path) -> SweepConfig:
    return SweepConfig(out=str(tmp_path / "out"), models=(str(tiny_model_dir),),
                       tasks=({"name": "linear2d", "angles": (0, 45)},), methods=("icl", "lora", "full"),
                       shots=(1, 2), seeds=(0,), orders=("random", "1221"), checkpoints=(0.5, 1.0), grid_step=10,
                       engine="hf", rsa=True, sft={"lora": SFT, "full": SFT},
                       implicit={"tasks": ("relation",), "methods": ("icl", "lora"), "shots": (0, 1), "train_size": 8,
                                 "eval_size": 4, "sft": {"lora": {"epochs": 1, "min_steps": 0, "batch_size": 4}}})


def by_kind(works):
    out = {}
    for w in works:
        out.setdefault((w.arm.rsplit("|", 1)[1], w.payload.kind), []).append(w)
    return out


def test_the_work_graph_of_a_small_sweep_counted_by_hand(config):
    # the orders only reorder the same 2K exemplars, and 2K <= the batch size: one batch, one training for both
    for angle in (0, 45):
        for k in (1, 2):
            sets = [set(map(tuple, linear2d.exemplars(TaskSpec(name="linear2d", angle=angle), 0, k, order)[
                ["n1", "n2"]].to_numpy().tolist())) for order in ("random", "1221")]
            assert sets[0] == sets[1]
    works = simulation_works(config, "gpu")
    kinds = by_kind(works)
    counts = {key: len(ws) for key, ws in kinds.items()}
    assert counts == {
        # ICL: one scoring per chain (angle, seed, order: 2 x 1 x 2) of both K; one RSA per chain (4)
        ("icl", "score"): 4, ("icl", "rsa"): 4,
        # 2 angles x 2 K trainings; one scoring per checkpoint (4 x 2 fractions) of both orders; RSA per checkpoint
        ("sft-lora", "train"): 4, ("sft-lora", "score"): 8, ("sft-lora", "rsa"): 8,
        ("sft-full", "train"): 4, ("sft-full", "score"): 8, ("sft-full", "rsa"): 8,
        ("implicit-icl", "score"): 1,  # one chain: 1 task, 1 seed, 2 K x 2 variants; no RSA for the implicit suite
        ("implicit-lora", "train"): 1, ("implicit-lora", "score"): 1,  # one model scored on both variants
        ("circuits", "circuits"): 3,  # relation: the base model, ICL, the LoRA model
    }
    assert {key: sum(w.payload.conditions for w in ws) for key, ws in kinds.items() if key[1] == "score"} == {
        ("icl", "score"): 8, ("sft-lora", "score"): 16, ("sft-full", "score"): 16, ("implicit-icl", "score"): 4,
        ("implicit-lora", "score"): 2}
    circuits = {w.payload.method: w.needs for w in kinds["circuits", "circuits"]}
    assert circuits == {"base": (), "icl-K8": (), "lora": (kinds["implicit-lora", "train"][0].id,)}
    by_id = {w.id: w for w in works}
    trainings = {w.id for w in works if w.role == "trainer"}
    for w in works:
        assert set(w.needs) <= set(by_id)
        if w.payload.kind == "score":
            assert len(w.needs) == (0 if w.payload.method == "icl" else 1) and set(w.needs) <= trainings
        if w.payload.kind == "rsa":  # after its unit's scoring, and its training
            unit = by_id[w.needs[0]]
            assert unit.payload.kind == "score" and unit.arm == w.arm and w.needs[1:] == unit.needs
    # each training: 2 steps, 2 checkpoints; GPU rates 0.05 s (LoRA) / 0.08 s (full) a step + 5 s model load,
    # SmolLM2's, scaled to the tiny model; implicit items are 80 tokens to a 2D example's 9
    assert {(w.payload.steps, w.payload.checkpoints) for w in kinds["sft-lora", "train"]} == {(2, 2)}
    assert [w.cost for w in kinds["sft-lora", "train"]] == [pytest.approx(2 * 0.05 * TRAIN + 5 * LOAD)] * 4
    assert [w.cost for w in kinds["sft-full", "train"]] == [pytest.approx(2 * 0.08 * TRAIN + 5 * LOAD)] * 4
    assert [w.payload.steps for w in kinds["implicit-lora", "train"]] == [2]  # 8 items in batches of 4
    assert [w.cost for w in kinds["implicit-lora", "train"]] == [pytest.approx(2 * 0.05 * TRAIN * 80 / 9 + 5 * LOAD)]
    # 100 queries per condition (step-10 lattice) at 13,600/s + 0.1 s per condition, two per chain; RSA + 0.2 s
    assert {w.payload.queries for w in kinds["icl", "score"]} == {200}
    assert {round(w.cost, 6) for w in kinds["icl", "score"]} == {round(2 * (100 / 13_600 * QUERY + 0.1), 6)}
    # RSA: each of the unit's two conditions (K, or orders sharing a checkpoint) + 0.2 s each
    assert {round(w.cost, 6) for w in kinds["icl", "rsa"]} == {round(2 * (100 / 13_600 * QUERY + 0.2), 6)}
    # a full fine-tune's RSA loads its checkpoint once per unit (5 s); a LoRA adapter is attached to the loaded base
    full_rsa = round(2 * (100 / 13_600 * QUERY + 0.2) + 5 * LOAD, 6)
    assert {round(w.cost, 6) for w in kinds["sft-full", "rsa"]} == {full_rsa}
    assert {round(w.cost, 6) for w in kinds["sft-lora", "rsa"]} == {round(2 * (100 / 13_600 * QUERY + 0.2), 6)}


def test_cpu_costs_grow_with_the_prompt(config):
    works = simulation_works(config, "cpu")
    icl = [w.cost for w in works if w.arm.endswith("|icl") and w.payload.kind == "score"]
    # each chain: K=1 and K=2, 100 queries x (1/140 s + 2.26 us x 18 or 36 prefix tokens: 2K exemplars of ~9
    # tokens) + 0.7 s each
    chain = sum(100 * (QUERY / 140 + 2.26e-6 * PREFIX * 18 * k) + 0.7 for k in (1, 2))
    assert icl == [pytest.approx(chain)] * 4
    sft = [w.cost for w in works if w.arm.endswith("|sft-lora") and w.payload.kind == "score"]
    assert sft == [pytest.approx(2 * (100 * QUERY / 140 + 0.7))] * 8  # scored zero-shot: no exemplars in the prompt
    # a training of the tiny model: its 2 LoRA steps (0.5 s x TRAIN = 0.012 s) and its load (2 s x LOAD = 0.048 s)
    # priced at the CPU's floors, the tiny model's measured 0.02 s a step and 0.1 s a training
    assert 0.5 * TRAIN < 0.02 and 2 * LOAD < 0.1
    train = [w.cost for w in works if w.arm.endswith("|sft-lora") and w.role == "trainer"]
    assert train == [pytest.approx(2 * 0.02 + 0.1)] * 4


def test_disk_use_of_the_tiny_model(config):
    # tiny Llama: hidden 64, 4 heads of 16 (2 for k, v: 32 wide), MLP 128, 2 layers, vocab 49,152, tied embeddings
    per_layer = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 128 + 2 * 64
    params = 49_152 * 64 + 2 * per_layer + 64
    lora = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))  # r 8, 7 modules, 2 layers
    kinds = by_kind(simulation_works(config, "gpu"))
    assert {w.payload.bytes for w in kinds["sft-lora", "train"]} == {2 * 4 * lora}  # 2 checkpoints, fp32
    assert {w.payload.bytes for w in kinds["sft-full", "train"]} == {2 * 4 * params}
    assert {w.payload.bytes for w in kinds["icl", "rsa"]} == {2 * 2 * 2 * 400 * 400 * 2}  # 2 conds, 2 x 2 layers
    assert {w.payload.bytes for w in kinds["icl", "score"]} == {2 * (100 * 24 + 4_000)}  # two conditions each


def test_engine_starts_one_per_scorer_and_full_checkpoints_swapped_in(config, monkeypatch):
    """hf and vllm swap each full checkpoint into the scorer's engine (priced: 0.5 s per GB of its fp32
    weights on a GPU); vllm starts a second engine for LoRA arms (LoRA is enabled at its start); an engine
    that cannot swap starts one per full checkpoint instead."""
    import iclsft.engine.base

    hf = simulate(config, simulation_works(config, "gpu"), gpus=1)
    assert hf.engine_starts == 1 and hf.setups == {"engine": 1, "hooks": 1}
    vllm = simulate(config, simulation_works(config, "gpu", engine="vllm"), gpus=1)
    assert vllm.engine_starts == 2
    full = [w.cost for w in simulation_works(config, "gpu", engine="vllm")
            if w.arm.endswith("|sft-full") and w.payload.kind == "score"]
    # each checkpoint's unit: its two orders, 100 queries each at 13,600/s + 0.1 s, after one swap
    assert full == [pytest.approx(4 * TINY_PARAMS / 1e9 * 0.5 + 2 * (100 / 13_600 * QUERY + 0.1))] * 8
    assert hf.usage.record()["scorer"]["works"] == 4 + 16 + 20 + 1 + 1 + 3  # scorings, RSA units, circuits

    class NoSwap:
        can_load_weights = False

    monkeypatch.setattr(iclsft.graph.simulate, "engine_class", lambda name: NoSwap)
    apart = simulate(config, simulation_works(config, "gpu", engine="vllm"), gpus=1)
    assert apart.engine_starts == 2 + 4 * 2  # and each full checkpoint (4 trainings x 2) once
    full = [w.cost for w in simulation_works(config, "gpu", engine="vllm")
            if w.arm.endswith("|sft-full") and w.payload.kind == "score"]
    assert full == [pytest.approx(2 * (100 / 13_600 * QUERY + 0.1))] * 8


def test_simulate_on_eight_gpus(config):
    sim = simulate(config, simulation_works(config, "gpu"), gpus=8)
    assert sim.slots.scorers + sim.slots.trainers == 8 and sim.devices == 8 and sim.cpus == 64
    record = sim.usage.record()
    assert (record["scorer"]["works"], record["trainer"]["works"]) == (45, 9)
    assert sim.makespan >= sim.bound > 0
    assert sim.work == pytest.approx(sum(sum(b.values()) for b in sim.usage.busy.values()))  # whole GPUs


def test_default_split_of_scorers_and_trainers():
    # 8 GPUs, 63% of the work scoring: 5 scorers (5/8 of the GPUs) finish 0.63/5 = 0.126 against 0.37/3 = 0.123;
    # 4 would take 0.158, 6 leave 2 trainers 0.185
    s = resolve(Resources(), 64, 8, 0.63)
    assert (s.scorers, s.trainers, s.scorer_gpus, s.trainer_gpus) == (5, 3, 1.0, 1.0)
    one = resolve(Resources(), 8, 1)  # one GPU: half each, or nothing could train
    assert (one.scorers, one.trainers, one.scorer_gpus, one.trainer_gpus) == (1, 1, 0.5, 0.5)
    cpu = resolve(Resources(), 2, 0, 0.9)  # 2 cores: one scorer beside one trainer, whatever the share
    assert (cpu.scorers, cpu.trainers, cpu.scorer_gpus, cpu.trainer_gpus) == (1, 1, 0.0, 0.0)
    given = resolve(Resources(scorers=2), 8, 4, 0.9)
    assert (given.scorers, given.trainers) == (2, 2)
    with pytest.raises(ValueError, match="leave no room for one trainer"):
        resolve(Resources(scorer_gpus=1), 8, 1)  # the scorer's whole GPU is never a trainer's
    with pytest.raises(ValueError, match=r"scoring share 1.5 must lie in \[0, 1\]"):
        resolve(Resources(), 8, 8, 1.5)


@pytest.fixture()
def config_file(config, tmp_path):
    data = config.model_dump(mode="json", exclude={"resources"})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_simulate_prints_one_row_per_gpu_count(config_file):
    result = CliRunner().invoke(main, ["sweep", str(config_file), "--simulate", "--gpus", "1,8"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("simulated (gpu rates, engine hf)")
    assert lines[1].split() == ["GPUs", "CPUs", "scorers", "trainers", "makespan", "work/workers", "ratio", "busy",
                                "scorers", "busy", "trainers", "busy", "engine", "starts"]
    rows = [line.split() for line in lines[2:4]]
    assert [r[:4] for r in rows] == [["1", "8", "1", "1"], ["8", "64", rows[1][2], rows[1][3]]]
    assert int(rows[1][2]) + int(rows[1][3]) == 8


def test_cli_dry_run_on_two_cpus(config_file):
    result = CliRunner().invoke(main, ["sweep", str(config_file), "--dry-run", "--gpus", "0", "--cpus", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "work, timed for CPUs (engine hf):" in out
    assert "  training  9 trainings, 18 steps:" in out  # 8 of 2 steps (2D) and 1 of 2 (implicit)
    # 8 + 16 + 16 2D conditions x 100 queries, 6 implicit x 4, in 4 + 8 + 8 + 1 + 1 works
    assert "  scoring   46 conditions in 22 works (ICL chains, checkpoints), 4,024 queries:" in out
    assert "on 2 CPUs: 1 x 1 CPU scoring, 1 x 1 CPU training (of 2 CPUs, 0 GPUs)" in out
    assert "  engine starts 1 (" in out and "RSA       40 conditions in 20 works" in out and "circuits  3 states" in out
    assert "rates: 140 queries/s + 2.26 us per prefix token" in out


@pytest.mark.parametrize("value", ["2,x", "1.5", "-1", ""])
def test_cli_bad_gpus_is_one_clear_line(config_file, value):
    result = CliRunner().invoke(main, ["sweep", str(config_file), "--simulate", "--gpus", value])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: --gpus {value!r}: {value.split(',')[-1]!r} is not a whole number of GPUs (0: CPUs only); "
        "give e.g. --gpus 1,8,64"]


def test_an_unreachable_ray_address_is_one_line(config_file):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(main, ["sweep", str(config_file), "--dry-run", "--ray-address", f"127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: no Ray cluster answers at ray_address '127.0.0.1:{port}' (Connection refused); start one with "
        "`ray start --head` or give the address `ray status` prints"]


def test_the_simulator_plans_the_works_the_real_graph_builds(config):
    """The simulator's works (no tokenizer) against those `GraphRun` builds for the same sweep from its real
    arms (tokenizer and all; nothing run): the same scorings (an ICL chain, or every condition of one
    checkpoint), RSA works, circuit states and trainings, each needing the same works, with the same labels
    and estimated seconds (the virtual engines' setups and checkpoint swaps aside). Work ids are compared
    after their arm prefix (the simulator names arms by model, the graph by run directory), a training by
    what needs it."""
    from iclsft.graph.run import GraphRun
    from iclsft.sweep.plan import planned_arms

    arms = [arm for planned in planned_arms(config).values() for arm in planned]
    imp = config.implicit
    graph = GraphRun(arms, "cpu", rsa=(config.dtype, config.rsa_subset),
                     circuits=(imp.circuit_pairs, imp.circuit_shots))
    try:
        real = graph.works
    finally:
        graph.close()

    def full_scoring(w) -> bool:
        return w.arm.endswith("sft-full") and w.role == "scorer" and "|rsa|" not in w.id

    def shape(works, swap: float = 0.0) -> set:
        """`swap`: the simulator's seconds for swapping a full checkpoint into the running engine (the real
        graph's estimates leave it out)."""
        local = {w.id: w.id[len(w.arm) + 1:] if w.role == "trainer" or "|circuits|" not in w.id
                 else w.id.rsplit("|", 1)[1] for w in works}
        needed_by: dict[str, set] = {}
        for w in works:
            for n in w.needs:
                needed_by.setdefault(n, set()).add(local[w.id])
        name = {i: (f"train<{sorted(needed_by[i])}>" if "train|" in rest else rest) for i, rest in local.items()}
        return {(w.role, w.arm.rsplit("|", 1)[1], name[w.id], frozenset(name[n] for n in w.needs),
                 w.label if w.role == "scorer" else w.label.split(" (", 1)[1],
                 round(w.cost - (swap if full_scoring(w) else 0.0), 9))
                for w in works}

    simulated = simulation_works(config, "cpu")
    swap = swap_seconds(full_checkpoint_bytes(model_shape(config.models[0])), "cpu")
    assert len(real) == len(simulated) and shape(real) == shape(simulated, swap)
    kinds = [(w.role, "rsa|" in w.id, "circuits|" in w.id) for w in real]
    # trainings: LoRA and full, one per angle and K (both orders share it), and the implicit LoRA model; RSA:
    # one per 2D scoring unit, 4 ICL chains (2 angles x 2 orders) and 16 checkpoints (8 trainings x 2
    # fractions); circuits: base, ICL and the LoRA model of the one task
    assert kinds.count(("trainer", False, False)) == 9
    assert (kinds.count(("scorer", True, False)), kinds.count(("scorer", False, True))) == (20, 3)
    assert len(real) == 54

