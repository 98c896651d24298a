"""`serve` stops what it started (iclsft.serve.run_server) and every command stops on SIGTERM as on
Ctrl-C (iclsft.cli.run), checked with stand-in servers: small Python programs that start an "engine"
child of their own, so no vLLM is needed. What is left is found by an environment variable that every
descendant inherits (tests/processes.py), independent of the process groups run_server signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from processes import marked

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")

# A server that starts an engine child, writes both pids, and on SIGTERM/SIGINT exits with `code`
# after stopping its engine only when `tidy` (vLLM's API server stops its engine core itself).
SERVER = textwrap.dedent("""
    import signal, subprocess, sys, time
    pids, code, tidy, stubborn = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
    watch = "import os, time\\np = os.getppid()\\nwhile os.getppid() == p: time.sleep(0.1)"  # vLLM's death pipe
    engine = subprocess.Popen([sys.executable, "-c", watch if tidy else "import time; time.sleep(600)"])
    def stop(signum, frame):
        if tidy:
            engine.terminate(); engine.wait()
        sys.exit(code)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if stubborn else stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN if stubborn else stop)
    open(pids, "w").write(f"{__import__('os').getpid()} {engine.pid}")
    if code == 99:
        time.sleep(3); sys.exit(3)  # ends by itself, leaving its engine behind
    time.sleep(600)
""")
DRIVER = ("import logging, os, sys; from iclsft.serve import run_server; logging.basicConfig(level=logging.INFO); "
          "sys.exit(run_server([sys.executable, '-c', sys.argv[1], *sys.argv[3:]], dict(os.environ), "
          "grace_s=float(sys.argv[2])))")


def start(tmp_path: Path, *, code=0, tidy=False, stubborn=False, grace=5.0, new_session=False):
    mark, pids = uuid.uuid4().hex, tmp_path / "pids"
    env = {**os.environ, "ICLSFT_TEST_MARK": mark, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, SERVER, str(grace), str(pids), str(code),
                             "1" if tidy else "0", "1" if stubborn else "0"], env=env, stderr=subprocess.PIPE,
                            text=True, start_new_session=new_session)
    deadline = time.time() + 30
    while not (pids.is_file() and pids.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    server, engine = map(int, pids.read_text().split())
    assert set(marked(mark)) >= {proc.pid, server, engine}
    return proc, mark


def gone(mark: str, within: float) -> bool:
    deadline = time.time() + within
    while marked(mark) and time.time() < deadline:
        time.sleep(0.1)
    return not marked(mark)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGHUP, 0)],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_stops_the_server_and_what_it_left(tmp_path, sig, status):
    """The server exits 0 on the forwarded signal but leaves its engine running: run_server kills the
    leftover; its exit status is the server's, and it says which signal stopped it."""
    proc, mark = start(tmp_path)
    os.kill(proc.pid, sig)  # the driver alone, as `kill PID` or a supervisor does
    assert proc.wait(timeout=20) == status
    assert gone(mark, within=5), marked(mark)
    assert f"after {signal.Signals(sig).name}" in proc.stderr.read()


def test_a_server_that_ignores_the_signal_is_killed_after_the_grace_period(tmp_path):
    proc, mark = start(tmp_path, stubborn=True, grace=1.0)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGKILL
    assert 1.0 <= time.monotonic() - t0 < 10
    assert gone(mark, within=5), marked(mark)
    assert "did not stop within 1 s: killed" in proc.stderr.read()


def test_a_server_that_ends_by_itself_gives_its_exit_code_and_leaves_nothing(tmp_path):
    proc, mark = start(tmp_path, code=99)
    assert proc.wait(timeout=20) == 3
    assert gone(mark, within=5), marked(mark)


@pytest.mark.parametrize("tidy", [True, False], ids=["engine-watches-its-parent", "engine-outlives-it"])
def test_a_killed_driver_takes_the_server_and_its_engine_with_it(tmp_path, tidy):
    """SIGKILL cannot be passed on: the kernel kills the server too (PR_SET_PDEATHSIG) and the reaper
    kills the rest of its group, an engine that does not end with its server included (vLLM's engine
    core outlived its server in CI); the driver's whole process group killed at once, likewise."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    proc, mark = start(tmp_path, tidy=tidy)
    proc.kill()
    proc.wait(timeout=20)
    assert gone(mark, within=10), marked(mark)


def test_a_killed_driver_group_takes_everything_with_it(tmp_path):
    """`kill -9 -PGID` of the driver's group (what a test harness or a job scheduler does)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    proc, mark = start(tmp_path, tidy=False, new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=20)
    assert gone(mark, within=10), marked(mark)


def test_the_cli_stops_on_sigterm_as_on_ctrl_c(tmp_path):
    """`iclsft-eval` (iclsft.cli.run): SIGTERM unwinds the command (finally blocks run) and the exit
    status is 128 + 15; a command that is not stopped is not changed."""
    script = tmp_path / "slow.py"
    flag = tmp_path / "cleaned"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        import click
        from iclsft.cli import main, run

        @main.command("slow-test")
        def slow():
            try:
                print("ready", flush=True)
                time.sleep(60)
            finally:
                open({str(flag)!r}, "w").write("yes")

        sys.argv = ["iclsft-eval", "slow-test"]
        run()
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert flag.read_text() == "yes"
