"""iclsft-eval: in-context learning vs supervised fine-tuning, shot by shot."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("iclsft-eval")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+src"
