"""`iclsft-eval`: a thin click layer. It parses options, builds a spec and calls the library.

Modules by job: app (the group, errors, logging), arms (icl, sft, implicit, sweep), results (metrics,
compare, report, claims, rsa, circuits), serving (serve, query), tools (bench, models).
"""

from iclsft.cli import arms, results, serving, tools  # noqa: F401 (each module registers its commands)
from iclsft.cli.app import main, run

__all__ = ["main", "run"]
