"""The run store (SPEC §10, STYLE 1–2): atomic writes, one frozen spec per run directory, condition
records written last, and condition ids that hash exactly what determines a result."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iclsft import artifacts
from iclsft.artifacts import atomic_write_bytes, atomic_write_json
from iclsft.errors import SpecMismatchError
from iclsft.spec import Condition, EngineSpec, IclRunSpec, ModelSpec, TaskSpec, TemplateSpec
from iclsft.store import RunDir

MODEL = ModelSpec(name="tiny", fingerprint="0123456789abcdef")


def run_spec(**overrides) -> IclRunSpec:
    fields = {"tasks": (TaskSpec(angle=45.0, grid_step=10),), "model": MODEL, "shots": (1, 2)}
    return IclRunSpec(**{**fields, **overrides})


def condition(**overrides) -> Condition:
    fields = {
        "task": TaskSpec(angle=30.0),
        "template": TemplateSpec(),
        "model": MODEL,
        "method": "icl",
        "shots": 5,
        "seed": 0,
        "order": "random",
        "dtype": "float32",
    }
    return Condition(**{**fields, **overrides})


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_creates_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "data.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert listing(target.parent) == ["data.bin"]


def test_atomic_write_json_round_trips(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"status": "ok", "n": 3, "path": Path("/x")})
    assert json.loads(target.read_text()) == {"status": "ok", "n": 3, "path": "/x"}
    assert listing(tmp_path) == ["r.json"]


def test_atomic_write_failing_rename_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"old content")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new content that never lands")
    assert target.read_bytes() == b"old content"
    assert listing(tmp_path) == ["data.bin"]  # the temp file was removed


def test_atomic_write_failing_midway_through_write_keeps_old_content(tmp_path, monkeypatch):
    """The write itself dies after half the bytes: the target must still hold the old bytes."""
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"old content")
    real_fdopen = os.fdopen
    written = []

    class HalfWriter:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()
            return False

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            written.append(len(data) // 2)
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(artifacts.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write_bytes(target, b"0123456789" * 10)
    assert written, "the patched writer was not used"
    assert target.read_bytes() == b"old content"
    assert listing(tmp_path) == ["data.bin"]
    assert not list(tmp_path.glob("*.tmp"))


def test_atomic_write_interrupted_keeps_old_content(tmp_path, monkeypatch):
    """Ctrl-C between write and rename (a BaseException, not an Exception) also cleans up."""
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"old")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["data.bin"]


# -- checked writes and verified reads (iclsft.artifacts) ------------------------------------------
# The reference digest is hashlib on the bytes the test itself wrote, never the module's own helper.


def test_write_checked_returns_size_and_sha256_of_what_is_on_disk(tmp_path):
    data = b"a checked artifact\n" * 1000
    info = artifacts.write_checked(tmp_path / "a" / "x.bin", data)
    assert info == {"bytes": 19_000, "sha256": hashlib.sha256(data).hexdigest()}
    assert (tmp_path / "a" / "x.bin").read_bytes() == data
    assert artifacts.read_verified(tmp_path / "a" / "x.bin", info) == data


def test_file_digest_reads_in_blocks_like_one_read(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_BLOCK", 7)  # many blocks, the last one short
    data = bytes(range(256)) * 3
    (tmp_path / "f").write_bytes(data)
    assert artifacts.file_digest(tmp_path / "f") == {"bytes": 768, "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.unlink(), "missing"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "cut short or grown"),
    (lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), "changed"),  # same size, one byte differs
])
def test_read_verified_names_the_file_and_what_is_wrong(tmp_path, damage, why):
    path = tmp_path / "scores.bin"
    info = artifacts.write_checked(path, b"0123456789")
    damage(path)
    with pytest.raises(ValueError) as e:
        artifacts.read_verified(path, info)
    assert str(e.value) == (f"{path} does not match the checksum recorded when it was written ({why}); "
                            "rerun the command that made it: a resumed run computes it again")
    assert artifacts.file_matches(path, info) is False


def test_read_verified_refuses_a_record_without_a_size(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="without a valid checksum record"):
        artifacts.read_verified(tmp_path / "f", {"sha256": hashlib.sha256(b"x").hexdigest()})


def test_manifest_lists_every_file_and_finds_the_damaged_ones(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.json").write_bytes(b"{}")
    (d / "sub" / "w.bin").write_bytes(b"\0" * 10)
    files = artifacts.manifest(d)
    assert files == {"a.json": {"bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
                     "sub/w.bin": {"bytes": 10, "sha256": hashlib.sha256(b"\0" * 10).hexdigest()}}
    assert artifacts.manifest_problems(d, files) == []
    (d / "sub" / "w.bin").write_bytes(b"\1" + b"\0" * 9)
    (d / "a.json").unlink()
    assert artifacts.manifest_problems(d, files) == ["a.json", "sub/w.bin"]


def test_publish_dir_renames_into_place_and_refuses_a_finished_copy(tmp_path):
    tmp, final = tmp_path / ".tmp-x", tmp_path / "x"
    tmp.mkdir()
    (tmp / "m.json").write_text("1")
    artifacts.publish_dir(tmp, final)
    assert listing(tmp_path) == ["x"] and (final / "m.json").read_text() == "1"
    other = tmp_path / ".tmp-y"
    other.mkdir()
    (other / "m.json").write_text("2")
    with pytest.raises(OSError):  # another writer's copy stays: the caller decides
        artifacts.publish_dir(other, final)
    assert (final / "m.json").read_text() == "1"
    artifacts.publish_dir(other, final, replace=True)
    assert (final / "m.json").read_text() == "2" and listing(tmp_path) == ["x"]


def test_set_aside_keeps_the_directory_under_a_dot_name(tmp_path):
    (tmp_path / "abc").mkdir()
    (tmp_path / "abc" / "w").write_bytes(b"w")
    aside = artifacts.set_aside(tmp_path / "abc", "damaged")
    assert re.fullmatch(r"\.damaged-abc-\d{8}T\d{6}-\d{6}", aside.name)
    assert listing(tmp_path) == [aside.name] and (aside / "w").read_bytes() == b"w"


# -- RunDir.open: one frozen spec per directory -------------------------------------------------


def test_open_fresh_dir_writes_spec(tmp_path):
    run = RunDir(tmp_path / "run")
    spec = run_spec()
    run.open(spec)
    stored = json.loads((tmp_path / "run" / "spec.json").read_text())
    assert stored == {"arms": {"icl": spec.model_dump(mode="json")}}
    assert IclRunSpec.model_validate(stored["arms"]["icl"]) == spec  # the stored spec round-trips exactly
    assert run.spec_json() == stored and run.arm_spec("icl") == stored["arms"]["icl"]


def test_open_again_with_equal_spec_passes_and_keeps_file(tmp_path):
    run = RunDir(tmp_path)
    run.open(run_spec())
    before = (tmp_path / "spec.json").read_bytes()
    RunDir(tmp_path).open(run_spec(shots=(2, 1, 1)))  # normalised to (1, 2): the same spec
    assert (tmp_path / "spec.json").read_bytes() == before


def test_open_with_different_shots_names_the_field(tmp_path):
    RunDir(tmp_path).open(run_spec())
    before = (tmp_path / "spec.json").read_bytes()
    with pytest.raises(SpecMismatchError, match="different spec") as info:
        RunDir(tmp_path).open(run_spec(shots=(1, 2, 5)))
    assert "shots" in str(info.value)
    assert "tasks" not in str(info.value) and "model" not in str(info.value)
    assert (tmp_path / "spec.json").read_bytes() == before
    assert isinstance(info.value, ValueError)  # the CLI turns ValueErrors into one clear line


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tasks": (TaskSpec(angle=46.0, grid_step=10),)}, "tasks"),
        ({"model": ModelSpec(name="tiny", fingerprint="fedcba9876543210")}, "model"),
        ({"template": TemplateSpec(header="Classify:\n")}, "template"),
        ({"seeds": (0, 1)}, "seeds"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"orders": ("12",)}, "orders"),
    ],
)
def test_open_with_other_differences_names_them(tmp_path, change, field):
    RunDir(tmp_path).open(run_spec())
    with pytest.raises(SpecMismatchError, match=rf"differs in: {field}\)"):
        RunDir(tmp_path).open(run_spec(**change))


def test_open_ignores_engine_transport_knobs(tmp_path):
    RunDir(tmp_path).open(run_spec())
    RunDir(tmp_path).open(run_spec(engine=EngineSpec.of("hf", token_budget=64, threads=1)))  # no error
    assert RunDir(tmp_path).arm_spec("icl")["engine"]["hf"]["token_budget"] is None  # first spec (default) stays frozen


def test_open_on_spec_of_another_layout_is_a_clear_error(tmp_path):
    (tmp_path / "spec.json").write_text('{"kind": "icl"}')
    with pytest.raises(SpecMismatchError, match="not written by this version"):
        RunDir(tmp_path).open(run_spec())


def test_a_second_arm_joins_when_model_and_template_match(tmp_path):
    from iclsft.spec import SftRunSpec

    RunDir(tmp_path).open(run_spec())
    icl = run_spec()
    sft = SftRunSpec(tasks=icl.tasks, model=icl.model, template=icl.template, shots=(1,))
    RunDir(tmp_path).open(sft)  # a new arm: accepted
    assert set(RunDir(tmp_path).spec_json()["arms"]) == {"icl", "sft-lora"}
    RunDir(tmp_path).open(sft)  # resuming it: accepted
    with pytest.raises(SpecMismatchError, match="sft-lora run with a different spec"):
        RunDir(tmp_path).open(sft.model_copy(update={"shots": (1, 2)}))
    other_model = SftRunSpec(tasks=icl.tasks, model=ModelSpec(name="m", fingerprint="0" * 16),
                             template=icl.template, shots=(1,), sft={"method": "full", "lr": 1e-5})
    with pytest.raises(SpecMismatchError, match="different model"):
        RunDir(tmp_path).open(other_model)


def test_open_on_corrupt_spec_is_a_clear_error(tmp_path):
    (tmp_path / "spec.json").write_text("{not json")
    with pytest.raises(SpecMismatchError, match="not valid JSON"):
        RunDir(tmp_path).open(run_spec())


# -- condition records --------------------------------------------------------------------------

FILES = {"scores.parquet": b"s" * 100, "field.npy": b"\x93NUMPY" + bytes(range(50))}


@pytest.fixture
def written(tmp_path):
    run = RunDir(tmp_path)
    run.open(run_spec())
    cond = run_spec().conditions()[0]
    run.write_condition(cond, FILES, seconds=1.5)
    return run, cond


def test_write_condition_then_done(written):
    run, cond = written
    assert run.is_done(cond)
    cdir = run.condition_dir(cond)
    assert sorted(p.name for p in cdir.iterdir()) == ["condition.json", "field.npy", "record.json",
                                                       "scores.parquet"]
    record = json.loads((cdir / "record.json").read_text())
    assert record["status"] == "ok" and record["condition"] == cond.id and record["seconds"] == 1.5
    for name, data in FILES.items():
        assert (cdir / name).read_bytes() == data
        assert record["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((cdir / "condition.json").read_text())["id"] == cond.id
    assert [c[0] for c in run.finished()] == [cdir]
    run.verify(cdir, record)  # no error


def test_other_condition_is_not_done(written):
    run, cond = written
    other = run_spec().conditions()[1]
    assert other.id != cond.id
    assert not run.is_done(other)


@pytest.mark.parametrize("new_size", [0, 50, 101])
def test_changed_file_size_is_not_done(written, new_size):
    run, cond = written
    (run.condition_dir(cond) / "scores.parquet").write_bytes(b"s" * new_size)
    assert not run.is_done(cond)


def test_missing_file_or_record_is_not_done(written):
    run, cond = written
    (run.condition_dir(cond) / "field.npy").unlink()
    assert not run.is_done(cond)
    run.write_condition(cond, FILES)
    assert run.is_done(cond)
    (run.condition_dir(cond) / "record.json").unlink()
    assert not run.is_done(cond)


def test_corrupt_record_is_not_done(written):
    run, cond = written
    (run.condition_dir(cond) / "record.json").write_text('{"status": "ok", "condi')
    assert not run.is_done(cond)


def test_error_record_is_not_done(tmp_path):
    run = RunDir(tmp_path)
    run.open(run_spec())
    cond = run_spec().conditions()[0]
    run.write_condition_error(cond, "RuntimeError: out of memory")
    record = run.read_record(run.condition_dir(cond))
    assert record["status"] == "error" and record["error"] == "RuntimeError: out of memory"
    assert not run.is_done(cond)
    assert run.finished() == []


def test_error_record_after_ok_record_is_not_done(written):
    run, cond = written
    run.write_condition_error(cond, "ValueError: boom")
    assert not run.is_done(cond)


def test_verify_catches_flipped_byte_of_equal_size(written):
    run, cond = written
    cdir = run.condition_dir(cond)
    f = cdir / "field.npy"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    record = run.read_record(cdir)
    assert not run.is_done(cond)  # contents are checked too: a resumed run computes the condition again
    with pytest.raises(ValueError, match="field.npy does not match the checksum"):
        run.verify(cdir, record)


def test_run_record_keeps_one_record_per_arm(tmp_path):
    run = RunDir(tmp_path)
    run.open(run_spec())
    run.write_arm_record("icl", "running", todo=2)
    run.write_arm_record("sft-lora", "running", todo=4)
    run.write_arm_record("icl", "ok", failed=0)  # replaces the icl record only: no last writer wins
    arms = json.loads((tmp_path / "record.json").read_text())["arms"]
    assert sorted(arms) == ["icl", "sft-lora"]
    assert arms["icl"]["status"] == "ok" and arms["icl"]["failed"] == 0 and "todo" not in arms["icl"]
    assert arms["sft-lora"]["status"] == "running" and arms["sft-lora"]["todo"] == 4
    assert arms["icl"]["version"] and run.arm_records() == arms


# -- condition ids ------------------------------------------------------------------------------

# Pinned: a change of this value without a HASH_VERSION bump would silently orphan finished runs.
EXPECTED_ID = "v3-e34f978e7529b30b"
# What it hashes, written out: every field of the condition, None and defaults included (iclsft.versions v3)
EXPECTED_FIELDS = (
    '{"checkpoint":null,"dtype":"float32","method":"icl","model":{"fingerprint":"0123456789abcdef","name":"tiny"},'
    '"order":"random","seed":0,"sft":null,"shots":5,"task":{"angle":30.0,"grid_step":1,"labels":[" Baz"," Rud"],'
    '"name":"linear2d","swap_labels":false,"words":null},"template":{"bos":"auto","chat":false,'
    '"exemplar":"{x1} {x2} ->{label}\\n","header":"","query":"{x1} {x2} ->"}}')


def test_condition_id_format_and_pinned_value():
    cid = condition().id
    assert re.fullmatch(r"v3-[0-9a-f]{16}", cid)
    assert cid == EXPECTED_ID == "v3-" + hashlib.sha256(EXPECTED_FIELDS.encode()).hexdigest()[:16]


def test_condition_id_stable_across_processes():
    code = "from tests.test_store import condition; print(condition().id)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == EXPECTED_ID


@pytest.mark.parametrize(
    "change",
    [
        {"task": TaskSpec(angle=31.0)},
        {"task": TaskSpec(angle=30.0, labels=(" Rud", " Baz"))},
        {"task": TaskSpec(angle=30.0, labels=(" Foo", " Rud"))},
        {"task": TaskSpec(angle=30.0, swap_labels=True)},
        {"task": TaskSpec(angle=30.0, grid_step=10)},
        {"shots": 6},
        {"seed": 1},
        {"order": "12"},
        {"dtype": "bfloat16"},
        {"method": "lora"},
        {"template": TemplateSpec(exemplar="{x1} {x2} ->{label}\n\n")},
        {"template": TemplateSpec(exemplar="{x1},{x2}:{label}\n", query="{x1},{x2}:")},
        {"template": TemplateSpec(header="Label each pair.\n")},
        {"template": TemplateSpec(bos="always")},
        {"model": ModelSpec(name="tiny", fingerprint="0123456789abcdee")},
        {"model": ModelSpec(name="other", fingerprint="0123456789abcdef")},
    ],
    ids=lambda c: "-".join(f"{k}" for k in c) + "-" + re.sub(r"\W+", "_", str(next(iter(c.values()))))[:40],
)
def test_condition_id_changes_with_result_fields(change):
    assert condition(**change).id != condition().id
    assert condition(**change).dirname != condition().dirname


def test_condition_ids_ignore_engine_spec():
    a = run_spec().conditions()
    b = run_spec(engine=EngineSpec.of("hf", token_budget=16, threads=3)).conditions()
    assert [c.id for c in a] == [c.id for c in b]
    assert len({c.id for c in a}) == len(a) == 2


def test_spec_conditions_cover_the_grid():
    spec = run_spec(tasks=(TaskSpec(angle=0.0), TaskSpec(angle=90.0)), shots=(5, 1), seeds=(0, 1))
    conds = spec.conditions()
    assert len(conds) == len({c.id for c in conds}) == 8
    assert {(c.task.angle, c.shots, c.seed) for c in conds} == {
        (a, k, s) for a in (0.0, 90.0) for k in (1, 5) for s in (0, 1)
    }


def test_spec_conditions_are_unique():
    try:
        spec = run_spec(tasks=(TaskSpec(angle=45.0), TaskSpec(angle=45.0)), shots=(1,), seeds=(0, 0))
    except ValueError:
        return  # rejecting duplicates up front is as good a fix as removing them
    conds = spec.conditions()
    assert len(conds) == len({c.id for c in conds})


def test_run_of_one_order_per_arm_still_resumes(tmp_path):
    """spec.json of 0.1 held `order: "random"` per arm; it reads as `orders: ["random"]`."""
    spec = run_spec()
    RunDir(tmp_path).open(spec)
    stored = json.loads((tmp_path / "spec.json").read_text())
    arm = stored["arms"]["icl"]
    arm["order"] = arm.pop("orders")[0]
    (tmp_path / "spec.json").write_text(json.dumps(stored))
    RunDir(tmp_path).open(spec)  # no SpecMismatchError


# -- one process per run directory -----------------------------------------------------------------
HOLD = """
import sys, time
from iclsft.store import RunDir
run = RunDir(sys.argv[1])
run.acquire_lock()
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(path: Path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_and_a_killed_holder_frees_the_lock(tmp_path):
    from iclsft.errors import RunLockedError

    spec = run_spec()
    RunDir(tmp_path).open(spec)
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another iclsft-eval process \(pid {holder.pid} on "):
            RunDir(tmp_path).acquire_lock()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
        holder.wait()
    run = RunDir(tmp_path)
    run.acquire_lock()  # no stale lock to remove by hand
    assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()
    run.acquire_lock()  # the holder may take it again
    run.release_lock()
    RunDir(tmp_path).acquire_lock()


def test_icl_run_into_a_locked_directory_writes_nothing(tmp_path, tiny_model_dir):
    from iclsft.arms import make_icl_spec
    from iclsft.errors import RunLockedError
    from iclsft.graph.driver import run_spec

    spec, ref = make_icl_spec(model=str(tiny_model_dir), angles=(30.0,), shots=(1,), grid_step=20)
    RunDir(tmp_path).open(spec)
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunLockedError, match="use another --out"):
            run_spec(spec, tmp_path, ref, progress=False)
        from click.testing import CliRunner

        from iclsft.cli import main

        result = CliRunner().invoke(main, ["icl", "--model", str(tiny_model_dir), "--angle", "30", "--shots", "1",
                                           "--grid-step", "20", "--engine", "hf", "--out", str(tmp_path)])
        assert result.exit_code == 1 and f"pid {holder.pid}" in result.output and "Traceback" not in result.output
        assert not (tmp_path / "conditions").exists() and not (tmp_path / "record.json").exists()
    finally:
        holder.kill()
        holder.wait()
    run_spec(spec, tmp_path, ref, progress=False)
    assert json.loads((tmp_path / "record.json").read_text())["arms"]["icl"]["status"] == "ok"
