"""Sweeps: a YAML config (`config`), what it computes and what is left (`plan`), and running it (`run`).

    cfg = load_config("configs/demo-cpu.yaml", ["shots=[1,2]"])
    print(format_plan(cfg, "cpu"))        # --dry-run
    tables = run_sweep(cfg)               # {model: metrics table}
"""

from iclsft.sweep.config import SweepConfig, apply_override, load_config
from iclsft.sweep.plan import arm_specs, format_plan, implicit_dir, implicit_specs, model_dir, plan
from iclsft.sweep.run import run_sweep

__all__ = ["SweepConfig", "apply_override", "arm_specs", "format_plan", "implicit_dir", "implicit_specs",
           "load_config", "model_dir", "plan", "run_sweep"]
