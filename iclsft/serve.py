"""Serving a run's adapters for ad-hoc queries: `iclsft-eval serve RUN` and `iclsft-eval query`.

`serve` starts vLLM's OpenAI-compatible server for the run's base model with every finished LoRA
checkpoint of the run registered under a readable name (`linear2d-a45-K10-lora-s0`, plus `-c0.5`
for a checkpoint at half of training). Registration reads no weights: an adapter is loaded at its
first request and at most --max-cpu-loras stay in memory (iclsft.engine.vllm_cli), so the 2,304
checkpoints per method of the paper's configuration cost nothing at start-up. Engine options come
from iclsft.engine.vllm_options as for the in-process engine: max_model_len from the run's longest
prompt (at least 2048), --max-loras adapters per batch. It binds to 127.0.0.1 unless told otherwise; the API key
travels in the environment (`VLLM_API_KEY`), never on the command line. Adapters come only from
the run directory: runtime adapter loading stays off unless `--allow-adapter-loading` (which the
`vllm-server` engine needs) is given, and then accepts only a checkpoint directory directly under
RUN/adapters (iclsft.engine.vllm_cli checks each request; a damaged checkpoint is not registered).
Requests are bounded: at most MAX_PROMPTS_PER_REQUEST prompts per completion request and
MAX_SEQUENCES_PER_PROMPT sequences per prompt (vLLM's VLLM_MAX_COMPLETION_PROMPTS and
VLLM_MAX_N_SEQUENCES), each prompt at most the model's context (`--max-model-len N` lowers it).
Options that `serve` sets itself cannot be overridden through the arguments passed on to vLLM.

`query` builds the same token-id prompts as a run (the run's template and labels, one BOS at
most) and prints both label probabilities for each input point.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from iclsft.engine.reads import adapter_rank
from iclsft.engine.vllm_cli import LAZY_ENV
from iclsft.engine.vllm_options import CPU_KV_CACHE_GIB, VLLMOptions, model_context, serve_flags
from iclsft.engine.vllm_server import VLLMServerEngine
from iclsft.models import resolve_model
from iclsft.prompts import builder_for, builder_key
from iclsft.sft.adapters import ADAPTERS_DIR, checkpoint_problem, is_finished, read_marker
from iclsft.spec import TaskSpec, TemplateSpec, stored_task
from iclsft.tasks import linear2d

logger = logging.getLogger(__name__)

MAX_PROMPTS_PER_REQUEST = 256  # the vllm-server engine sends 64
MAX_SEQUENCES_PER_PROMPT = 16
GUARD = "iclsft.engine.vllm_guard.PromptLogprobsGuard"
STOP_GRACE_S = 20.0  # after SIGTERM/SIGINT/SIGHUP: how long the server has to stop before it is killed
ADAPTER_ROOT_ENV = "ICLSFT_ADAPTER_ROOT"  # tells iclsft.engine.vllm_cli where runtime loading may read
# `vllm serve` options that serve sets (or must not be changed: the adapter check runs in this API server process)
MANAGED_OPTIONS = {"--host": "--host", "--port": "--port", "--api-key": "--api-key (or $ICLSFT_VLLM_API_KEY)",
                   "--lora-modules": "the run directory's adapters", "--served-model-name": "the run's model name",
                   "--api-server-count": "one API server", "-asc": "one API server"}


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    path: Path
    rank: int


def run_adapters(run_dir: str | Path, damaged: list[str] | None = None) -> list[ServedAdapter]:
    """Every finished LoRA checkpoint of a run, with a readable unique name. A checkpoint whose files
    do not match its marker is left out (and described in `damaged`, when given)."""
    root = Path(run_dir) / ADAPTERS_DIR
    found: list[tuple[str, Path, int]] = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".") or not is_finished(path) or not (path / "adapter_config.json").is_file():
            continue  # temporary or set aside, unfinished, or a full fine-tune (a model of its own)
        problem = checkpoint_problem(path)
        if problem:
            if damaged is not None:
                damaged.append(problem)
            continue
        m = read_marker(path)
        name = f"{m.get('task', 'linear2d')}-a{m['angle']:g}-K{m['shots']}-{m['method']}-s{m['seed']}"
        if m.get("fraction", 1.0) != 1.0:
            name += f"-c{m['fraction']:g}"
        rank = adapter_rank(path)
        found.append((name, path, rank))
    counts: dict[str, int] = {}
    for name, _, _ in found:
        counts[name] = counts.get(name, 0) + 1
    return [ServedAdapter(name if counts[name] == 1 else f"{name}-{path.name[:8]}", path, rank)
            for name, path, rank in found]


def run_base_model(run_dir: str | Path) -> tuple[dict, Path]:
    """The run's spec (any arm; they share model and template) and its resolved base model directory."""
    spec_file = Path(run_dir) / "spec.json"
    if not spec_file.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no spec.json)")
    arms = json.loads(spec_file.read_text())["arms"]
    spec = next(iter(arms.values()))
    ref = resolve_model(spec["model"]["name"])
    if ref.fingerprint != spec["model"]["fingerprint"]:
        raise ValueError(f"model {spec['model']['name']!r} has changed since the run was made "
                         f"(fingerprint {ref.fingerprint}, run has {spec['model']['fingerprint']})")
    return arms, ref.path


def serve_command(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
                  allow_adapter_loading: bool = False, max_lora_rank: int | None = None,
                  options: VLLMOptions | None = None, extra: tuple[str, ...] = ()) -> tuple[list[str], list]:
    """The `vllm serve` command line for a run, and the adapters it registers. `max_lora_rank`: the
    largest rank of adapters loaded later at run time (default: the run's largest, at least 8).
    `options`: engine options (dtype default: the run's, so that served scores match stored ones);
    a flag also given in `extra` is left to `extra`."""
    check_extra_args(extra)
    arms, base = run_base_model(run_dir)
    adapters = run_adapters(run_dir)
    spec = next(iter(arms.values()))
    options = options or VLLMOptions()
    if options.dtype is None:
        options = options.model_copy(update={"dtype": dtype or spec["dtype"]})
    rank = None
    if adapters or allow_adapter_loading:
        rank = max([a.rank for a in adapters] + [max_lora_rank or 8])
    longest = run_longest_prompt(run_dir) if options.max_model_len is None else None
    cmd = [sys.executable, "-m", "iclsft.engine.vllm_cli", "serve", str(base), "--host", host,
           "--port", str(port), "--served-model-name", spec["model"]["name"]]
    gpu = _has_gpu()
    cmd += serve_flags(options, gpu=gpu, lora_rank=rank, longest_prompt=longest and longest[0],
                       label_tokens=longest and longest[1], model_context=model_context(base), given=extra)
    if rank is not None and not gpu:
        cmd += ["--middleware", GUARD]  # prompt log-probs one at a time (iclsft.engine.vllm_guard)
    if adapters:
        cmd += ["--lora-modules", *[f"{a.name}={a.path.resolve()}" for a in adapters]]
    return cmd + list(extra), adapters


def run_longest_prompt(run_dir: str | Path) -> tuple[int, int] | None:
    """(tokens of the run's longest prompt, of its longest label): the ICL prefix at the largest K for
    every task, seed and order, plus the longest grid query. None when this run's prompts cannot be
    rebuilt here (then vLLM's own max_model_len applies)."""
    from transformers import AutoTokenizer

    try:
        arms, base = run_base_model(run_dir)
        tokenizer = AutoTokenizer.from_pretrained(base)
        longest, label = 0, 1
        for arm, spec in arms.items():
            template = TemplateSpec(**spec["template"])
            for stored in spec["tasks"]:
                task = stored_task(stored)
                builder = builder_for(tokenizer, template, task)
                grid = linear2d.queries(task)
                query = max(len(q) for q in builder.queries(grid.n1, grid.n2))
                label = max([label, *(len(ids) for ids in builder.label_ids)])
                prefix = len(builder.start())
                if arm == "icl":
                    for seed in spec["seeds"]:
                        for order in spec.get("orders", ["random"]):
                            ex = linear2d.exemplars(task, seed, max(spec["shots"]), order)
                            prefix = max(prefix, len(builder.prefix(ex.n1, ex.n2, ex.truth)))
                longest = max(longest, prefix + query)
        return (longest, label) if longest else None
    except (KeyError, TypeError, ValueError, OSError):
        return None


def check_extra_args(extra: tuple[str, ...]) -> None:
    """Refuse arguments for `vllm serve` that would override what serve sets (bind address, key, adapters)."""
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name in MANAGED_OPTIONS:
            raise ValueError(f"{name} cannot be passed on to vLLM: serve sets it ({MANAGED_OPTIONS[name]}); "
                             "other vLLM options are passed on unchanged")


def server_env(run_dir: str | Path, api_key: str | None, allow_adapter_loading: bool,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the vLLM server: the key (never on the command line), runtime adapter loading
    only when asked for and then only from RUN/adapters, and the request size limits."""
    env = dict(os.environ if base is None else base)
    for name in ("VLLM_API_KEY", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_LORA_RESOLVER_CACHE_DIR", ADAPTER_ROOT_ENV):
        env.pop(name, None)  # from the caller's shell: would open the server wider than its options say
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if allow_adapter_loading:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env[ADAPTER_ROOT_ENV] = str((Path(run_dir) / ADAPTERS_DIR).resolve())
    env[LAZY_ENV] = "1"  # the run's adapters load at their first request, not at start-up
    env.setdefault("VLLM_MAX_COMPLETION_PROMPTS", str(MAX_PROMPTS_PER_REQUEST))
    env.setdefault("VLLM_MAX_N_SEQUENCES", str(MAX_SEQUENCES_PER_PROMPT))
    return env


def serve(run_dir: str | Path, *, host: str, port: int, api_key: str | None, allow_adapter_loading: bool,
          dtype: str | None, extra: tuple[str, ...], max_lora_rank: int | None = None,
          options: VLLMOptions | None = None) -> int:
    """Run the server in the foreground until it ends or this process gets SIGTERM, SIGINT (Ctrl-C) or
    SIGHUP (run_server); return its exit status."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError("serve needs vLLM: pip install 'iclsft-eval[cpu]' (CPU) or 'iclsft-eval[gpu]'")
    cmd, adapters = serve_command(run_dir, host=host, port=port, dtype=dtype,
                                  allow_adapter_loading=allow_adapter_loading, max_lora_rank=max_lora_rank,
                                  options=options, extra=extra)
    env = server_env(run_dir, api_key, allow_adapter_loading)
    if not _has_gpu():
        # vLLM's CPU backend reserves half the machine's memory for its KV cache by default
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{(options and options.kv_cache_gib) or CPU_KV_CACHE_GIB:g}")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    logger.info("serving the base model of %s with %d adapter(s) at %s:", run_dir, len(adapters), url)
    for a in adapters:
        logger.info("  %s", a.name)
    damaged: list[str] = []
    run_adapters(run_dir, damaged)
    for problem in damaged:
        logger.warning("NOT served: %s", problem)
    key = " --api-key $KEY" if api_key else ""
    example = adapters[0].name if adapters else "NAME"
    logger.info("query it (once the server says it is ready, after a minute or two):\n"
                "  iclsft-eval query --url %s%s --run %s --adapter %s 12 45\n"
                "  iclsft-eval query --url %s%s --icl %s --shots K 12 45",
                url, key, run_dir, example, url, key, run_dir)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("bound to %s without --api-key: anyone who can reach this port can use the server", host)
    return run_server(cmd, env)


def run_server(cmd: list[str], env: dict[str, str], grace_s: float = STOP_GRACE_S) -> int:
    """Run the server in a process group of its own and stop all of it with this process: SIGTERM,
    SIGINT and SIGHUP are passed on to the group (SIGHUP as SIGTERM), whatever is left of it after
    `grace_s` is killed, and so is anything the server leaves behind when it ends (its engine
    processes); if this process is killed outright, so is the server (_die_with_parent) and, by a
    reaper process, everything in its group.
    Returns the server's exit code, or 128 + the signal that ended it (as a shell does)."""
    import signal
    import subprocess
    import time

    parent = os.getpid()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=functools.partial(_die_with_parent, parent))
    reaper = _start_reaper(proc.pid)
    stop: list[tuple[int, float]] = []

    def forward(signum, _frame) -> None:
        if not stop:
            stop.append((signum, time.monotonic()))
            logger.info("%s: stopping the server (up to %g s)", signal.Signals(signum).name, grace_s)
        _signal_group(proc.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    caught = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in caught}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop and time.monotonic() - stop[0][1] > grace_s:
                    logger.warning("the server did not stop within %g s: killed", grace_s)
                    _signal_group(proc.pid, signal.SIGKILL)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _signal_group(proc.pid, signal.SIGKILL)  # engine processes the server left behind, if any
        if proc.poll() is None:
            proc.wait()
        if reaper is not None:
            reaper.kill()
            reaper.wait()
    code = 128 - code if code < 0 else code
    logger.info("the server ended with exit status %d%s", code,
                f" after {signal.Signals(stop[0][0]).name}" if stop else "")
    return code


# Kills the server's process group when the process that started it dies, however it dies: vLLM's
# engine core outlives its API server killed by PR_SET_PDEATHSIG (seen in CI: an EngineCore and its
# worker, 5.8 GB, left running for half an hour after the test killed `serve` with SIGKILL).
REAPER = """
import ctypes, os, signal, sys
pgid, parent = int(sys.argv[1]), int(sys.argv[2])
def reap(*_):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    os._exit(0)
signal.signal(signal.SIGTERM, reap)
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
if os.getppid() != parent:
    reap()
while True:
    signal.pause()
"""


def _start_reaper(pgid: int):
    """A small process in a session of its own (so no signal to this process's group reaches it) that
    kills the process group `pgid` once this process has died (Linux; elsewhere None)."""
    import subprocess

    if not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen([sys.executable, "-c", REAPER, str(pgid), str(os.getpid())], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _die_with_parent(parent: int) -> None:
    """In the server's process, before it starts: SIGKILL when this process dies, even by SIGKILL (Linux
    prctl PR_SET_PDEATHSIG), since the server's own process group does not share its fate. SIGKILL, not
    SIGTERM: vLLM's graceful stop goes on serving its open requests, while a CLI killed outright means
    the server is gone. Its engine processes do not all end with it: the reaper kills them."""
    import ctypes
    import signal

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the call
            os.kill(os.getpid(), signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def query_points(url: str, points: list[tuple[int, int]], *, run_dir: str | Path | None = None,
                 adapter: str | None = None, icl_run: str | Path | None = None, shots: int | None = None,
                 angle: float | None = None, seed: int = 0, order: str | None = None,
                 api_key: str | None = None) -> list[dict]:
    """Both label probabilities for each point, from a running server (base model, adapter or ICL prompt)."""
    import numpy as np
    from transformers import AutoTokenizer

    run = icl_run or run_dir
    engine = VLLMServerEngine(url, api_key=api_key, retries=1, timeout=120, progress=False)
    if run is not None:
        arms, base = run_base_model(run)
        spec = arms.get("icl") or next(iter(arms.values()))
    else:
        spec, base = None, _server_root(engine)
    template = TemplateSpec(**spec["template"]) if spec else TemplateSpec()
    tasks = [stored_task(t) for t in spec["tasks"]] if spec else [TaskSpec(angle=angle or 45.0)]
    if icl_run is not None or len({builder_key(t) for t in tasks}) > 1:
        task = _pick_task(tasks, angle)
    else:
        task = tasks[0]  # every task of the run writes prompts alike
    builder = builder_for(AutoTokenizer.from_pretrained(base), template, task)
    prefix = builder.start()
    if icl_run is not None:
        if shots is None:
            raise ValueError("--icl needs --shots K (exemplars per class)")
        orders = spec.get("orders", ["random"])
        order = order or orders[0]
        if order not in orders:
            raise ValueError(f"order {order!r} is not in the run (its orders: {', '.join(orders)})")
        exemplars = linear2d.exemplars(task, seed, shots, order)
        prefix = builder.prefix(exemplars.n1, exemplars.n2, exemplars.truth)
    model = engine.base_model
    if adapter is not None:
        served = {m["id"] for m in engine.served_models()}
        if adapter not in served:
            raise ValueError(f"adapter {adapter!r} is not served at {url}; served: {', '.join(sorted(served))}")
        model = adapter
    queries = builder.queries_after(prefix, [a for a, _ in points], [b for _, b in points])  # as scoring does
    lp = engine.score_served(model, prefix, queries, builder.label_ids)
    labels = task.labels
    return [{"n1": a, "n2": b, labels[0]: float(np.exp(row[0])), labels[1]: float(np.exp(row[1]))}
            for (a, b), row in zip(points, lp)]


def _pick_task(tasks, angle: float | None):
    if angle is None:
        if len(tasks) > 1:
            raise ValueError(f"the run has several angles ({', '.join(f'{t.angle:g}' for t in tasks)}): "
                             "choose one with --angle")
        return tasks[0]
    for t in tasks:
        if t.angle == angle:
            return t
    raise ValueError(f"angle {angle:g} is not in the run (its angles: {', '.join(f'{t.angle:g}' for t in tasks)})")


def _server_root(engine) -> Path:
    root = engine.base_root()
    if not root or not Path(root).is_dir():
        raise ValueError("the server's model is not a local directory: give --run RUN so the tokenizer and "
                         "template can be found")
    return Path(root)
