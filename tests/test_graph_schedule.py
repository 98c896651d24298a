"""The sweep scheduler (iclsft.graph.schedule) on the simulator's virtual clock, against schedules worked
out by hand: which slot runs what, when, and how busy each role was."""

from __future__ import annotations

import time

import pytest

from iclsft.graph.schedule import schedule
from iclsft.graph.simulate import VirtualBackend
from iclsft.graph.work import Work


def run(works, slots, **options):
    backend = VirtualBackend(slots, **options)
    done = []
    usage = schedule(works, backend, done.append)
    return usage, {d.work.id: (d.worker, d.started, d.ended, d.error) for d in done}, backend


def train(name, seconds, **kw):
    return Work(name, "trainer", name, seconds, **kw)


def score(name, seconds, needs=(), **kw):
    return Work(name, "scorer", name, seconds, needs=needs, **kw)


def test_three_trainings_on_two_slots_longest_first():
    # by hand: t=0 the 5 s and 3 s trainings start (longest first, on trainer-0 then trainer-1);
    # t=3 trainer-1 takes the 2 s one; both end at 5
    usage, ran, _ = run([train("b", 3), train("c", 2), train("a", 5)], {"trainer": 2})
    assert ran == {"a": ("trainer-0", 0, 5, None), "b": ("trainer-1", 0, 3, None), "c": ("trainer-1", 3, 5, None)}
    assert usage.makespan == 5
    assert usage.record()["trainer"] == {"works": 3, "seconds": 10.0, "workers": 2, "utilisation": 1.0}


def test_one_trainer_slot_runs_trainings_longest_first():
    usage, ran, _ = run([train("short", 2), train("long", 7), train("mid", 4)], {"trainer": 1})
    assert [(w, ran[w][1], ran[w][2]) for w in ("long", "mid", "short")] == [("long", 0, 7), ("mid", 7, 11),
                                                                          ("short", 11, 13)]
    assert usage.makespan == 13


def test_checkpoint_scorings_go_before_icl():
    # one scorer, one trainer. t=0: ICL a (2 s) starts, the 1 s training too. t=1: the checkpoint's scoring
    # is ready, but the scorer is busy. t=2: it goes before ICL b and c: 2-3, then b 3-5, c 5-7.
    works = [score("icl-a", 2), score("icl-b", 2), score("icl-c", 2), train("t", 1), score("ckpt", 1, ("t",))]
    usage, ran, _ = run(works, {"scorer": 1, "trainer": 1})
    assert {w: ran[w][1:3] for w in ran} == {"icl-a": (0, 2), "t": (0, 1), "ckpt": (2, 3), "icl-b": (3, 5),
                                             "icl-c": (5, 7)}
    record = usage.record()
    assert usage.makespan == 7
    assert record["scorer"]["utilisation"] == 1.0 and record["trainer"]["utilisation"] == round(1 / 7, 3)


def test_scorer_utilisation_by_hand():
    # scorer-0 runs the 4 s work (0-4); scorer-1 the two 1 s works (0-1, 1-2): busy 6 of 2 x 4 slot-seconds
    usage, ran, _ = run([score("x", 4), score("y", 1), score("z", 1)], {"scorer": 2})
    assert ran["x"][:3] == ("scorer-0", 0, 4) and ran["z"][:3] == ("scorer-1", 1, 2)
    assert usage.record()["scorer"] == {"works": 3, "seconds": 6.0, "workers": 2, "utilisation": 0.75}


def test_a_failed_training_fails_its_dependents_unrun():
    started = []

    class Recording(VirtualBackend):
        def start(self, work, slot, inputs):
            started.append(work.id)
            super().start(work, slot, inputs)

    works = [train("bad", 3), train("good", 1), score("bad-1", 1, ("bad",)), score("bad-2", 1, ("bad",)),
             score("good-1", 1, ("good",)), score("icl", 1)]
    backend = Recording({"trainer": 1, "scorer": 1}, fail={"bad"})
    done = []
    schedule(works, backend, done.append)
    by_id = {d.work.id: d for d in done}
    assert sorted(started) == ["bad", "good", "good-1", "icl"]  # the bad training's scorings never start
    assert by_id["bad"].error == "bad: failed (simulated)"
    for dep in ("bad-1", "bad-2"):  # they end when the training does, with its error, on no slot
        assert (by_id[dep].error, by_id[dep].worker, by_id[dep].started, by_id[dep].ended) == (
            "bad: failed (simulated)", "-", 3, 3)
    assert by_id["good-1"].error is None and by_id["icl"].error is None
    assert set(backend.forgotten) >= {"bad", "good"}  # results no dependent needs are let go


def test_a_setup_is_paid_once_per_slot():
    # each scorer opens the engine (10 s) before its first work: scorer-0 runs a in 10+1, scorer-1 b; both
    # free at 11, the slot freed last (scorer-1) takes c, its engine already open: 11-12
    opens = (("engine|m", 10.0),)
    works = [score("a", 1, setup=opens), score("b", 1, setup=opens), score("c", 1, setup=opens)]
    usage, ran, backend = run(works, {"scorer": 2})
    assert ran == {"a": ("scorer-0", 0, 11, None), "b": ("scorer-1", 0, 11, None), "c": ("scorer-1", 11, 12, None)}
    assert backend.setups == {"engine": 2} and backend.work == 23


def test_slots_holding_half_a_gpu_share_it():
    # scorer and trainer on one GPU, half each: both run at half speed until the 2 s training ends at 4;
    # the scorer's 4 s work has 2 s left, alone on the GPU, and ends at 6 = the GPU's total work
    usage, ran, backend = run([score("s", 4), train("t", 2)], {"scorer": 1, "trainer": 1},
                              gpus={"scorer": 0.5, "trainer": 0.5})
    assert ran["t"][1:3] == (0, 4) and ran["s"][1:3] == (0, 6)
    assert backend.devices == 1 and usage.makespan == 6


def test_whole_gpus_are_not_shared():
    usage, ran, backend = run([score("s", 4), train("t", 2)], {"scorer": 1, "trainer": 1},
                              gpus={"scorer": 1, "trainer": 1})
    assert ran["t"][1:3] == (0, 2) and ran["s"][1:3] == (0, 4) and backend.devices == 2


def test_quarter_gpu_trainers_pack_four_to_a_gpu():
    backend = VirtualBackend({"scorer": 2, "trainer": 6}, gpus={"scorer": 1, "trainer": 0.25})
    assert backend.devices == 4  # 2 scorer GPUs, then trainers 0-3 on one GPU and 4-5 on another
    assert backend.group == {f"trainer-{i}": g for i, g in enumerate([0, 0, 0, 0, 1, 1])}


def test_thousands_of_works_in_well_under_a_second():
    works = [train(f"t{i}", 1 + i % 7) for i in range(500)]
    works += [score(f"s{i}", 0.5, (f"t{i % 500}",)) for i in range(4500)]
    began = time.perf_counter()
    usage, ran, _ = run(works, {"scorer": 6, "trainer": 2})
    assert time.perf_counter() - began < 2.0  # about 0.1 s alone; generous for a loaded 2-core machine
    assert len(ran) == 5000 and usage.record()["trainer"]["seconds"] == sum(1 + i % 7 for i in range(500))
    # determinism: the same schedule again
    assert run(works, {"scorer": 6, "trainer": 2})[1] == ran


def test_bad_backend_input_is_one_clear_error():
    with pytest.raises(ValueError, match="no scorer slot to run"):
        run([score("a", 1)], {"trainer": 1})
    with pytest.raises(RuntimeError, match="no work running"):
        VirtualBackend({"scorer": 1}).wait()


def test_disk_of_full_checkpoints_per_policy():
    from iclsft.graph.simulate import Stand, _FullCheckpoints

    # t=0-1 A trains (2 checkpoints, 100 bytes); a1 scores A 1-6 on the one scorer while B (1 checkpoint, 50)
    # trains 1-2: 150 on disk; under `none` A goes at 6, B at 7 (b1: 6-7); under `final` A keeps its last 50.
    # A LoRA training's adapter is not counted.
    works = [train("A", 1, payload=Stand("train", "m", "full", checkpoints=2, bytes=100)),
             train("B", 1, payload=Stand("train", "m", "full", checkpoints=1, bytes=50)),
             train("L", 0.5, payload=Stand("train", "m", "lora", bytes=1000)),
             score("a1", 5, ("A",)), score("b1", 1, ("B",)), score("l1", 1, ("L",))]
    held = _FullCheckpoints(works)
    ends = []

    def done(d):
        held.done(d)
        ends.append((d.work.id, d.ended, dict(held.now)))

    schedule(works, VirtualBackend({"trainer": 1, "scorer": 1}), done)
    assert held.disk() == {"all": (150, 150), "final": (150, 100), "none": (150, 0)}
    assert [(w, t, now) for w, t, now in ends if w in ("a1", "b1")] == [
        ("a1", 6, {"none": 50, "final": 100}), ("b1", 7, {"none": 0, "final": 100})]


def test_full_checkpoints_in_flight_are_bounded():
    """By hand, 2 trainer slots, 1 scorer, max_held 3: A (5 s, 2 checkpoints) and B (4 s, 1) start at 0;
    at 4 trainer-1 is free but C (3 s, 1) would make 4 held, so the LoRA training L (holds nothing) takes
    it (4-4.5); B's scoring (4-5) lets B go at 5, and C starts then (5-8). Without the bound C starts at 4.
    With max_held 2, A alone holds 2: B and C wait until A's scoring lets it go (7)."""
    def works():
        return [train("A", 5, holds=2), train("B", 4, holds=1), train("C", 3, holds=1), train("L", 0.5),
                score("a", 2, ("A",)), score("b", 1, ("B",)), score("c", 1, ("C",)), score("l", 0.5, ("L",))]

    def ran(max_held):
        done = []
        schedule(works(), VirtualBackend({"trainer": 2, "scorer": 1}), done.append, max_held=max_held)
        return {d.work.id: (d.started, d.ended) for d in done}

    three = ran(3)
    assert (three["A"], three["B"], three["L"], three["b"], three["C"]) == ((0, 5), (0, 4), (4, 4.5), (4, 5), (5, 8))
    assert ran(None)["C"] == (4, 7)
    two = ran(2)
    assert two["A"] == (0, 5) and two["a"] == (5, 7) and two["B"][0] == two["C"][0] == 7
    with pytest.raises(ValueError, match="max_held 0: at least 1"):
        schedule(works(), VirtualBackend({"trainer": 1, "scorer": 1}), lambda d: None, max_held=0)


def test_a_work_needing_a_failed_training_twice_over_ends_once():
    # RSA of a checkpoint's condition needs its scoring and its training: the failed training ends the
    # scoring, unrun, which ends the RSA; the training's own edge to the RSA then finds it ended
    works = [train("t", 2), score("s", 1, ("t",)), score("rsa", 1, ("s", "t"))]
    done = []
    schedule(works, VirtualBackend({"trainer": 1, "scorer": 1}, fail={"t"}), done.append)
    assert [(d.work.id, d.worker, d.ended, d.error) for d in done] == [
        ("t", "trainer-0", 2, "t: failed (simulated)"), ("s", "-", 2, "t: failed (simulated)"),
        ("rsa", "-", 2, "t: failed (simulated)")]


def test_a_scorer_keeps_to_its_model_while_that_model_has_work():
    # two scorers, ICL of models A and B ready at once, in plan order A1 B1 A2 B2 A3 B3 (1 s each).
    # By hand: t=0 one scorer takes A1, the other B1; at t=1 each keeps to its model (A2 / B2), at t=2
    # the same (A3 / B3): no slot ever loads both models, and all ends at 3.
    works = [score(f"{m}{i}", 1, affinity=m) for i in (1, 2, 3) for m in "AB"]
    _, ran, _ = run(works, {"scorer": 2})
    models = {slot: {w[0] for w, (s, *_) in ran.items() if s == slot} for slot in ("scorer-0", "scorer-1")}
    assert sorted(map(sorted, models.values())) == [["A"], ["B"]]
    assert max(end for _, _, end, _ in ran.values()) == 3


def test_a_scorer_takes_another_model_when_its_own_has_nothing_ready():
    # one scorer: A's checkpoint scoring needs a 2 s training; B's ICL is ready. t=0 B1 (1 s); t=1 B2
    # (its own model, 1 s); t=2 the checkpoint of A is ready and B has nothing left: A (1 s), 2-3.
    works = [train("t", 2), score("A", 1, ("t",), affinity="A"), score("B1", 1, affinity="B"),
             score("B2", 1, affinity="B")]
    _, ran, _ = run(works, {"scorer": 1, "trainer": 1})
    assert {w: ran[w][1:3] for w in ("B1", "B2", "A")} == {"B1": (0, 1), "B2": (1, 2), "A": (2, 3)}
