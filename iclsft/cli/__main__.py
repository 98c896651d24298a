"""`python -m iclsft.cli`: the same as `iclsft-eval`."""

import sys

from iclsft.cli import run

sys.exit(run())
