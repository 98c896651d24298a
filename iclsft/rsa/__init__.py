"""Representational similarity analysis (SPEC §7), a resumable step after scoring.

    iclsft.rsa.activations  hooked activations (residual stream and MLP output per layer) at the last
                            query token, prefix KV computed once and reused for batches of queries
    iclsft.rsa.stats        blockwise cosine histograms, label-sorted subset matrices, collapse index
    iclsft.rsa.run          per-condition rsa.npz + rsa.json over a run directory

torch, transformers and peft are imported only when RSA is computed.
"""

from __future__ import annotations

from iclsft.rsa.run import RSA_JSON, RSA_NPZ, RSA_VERSION, compute_rsa, load_rsa, read_rsa_record, rsa_is_current

__all__ = ["RSA_JSON", "RSA_NPZ", "RSA_VERSION", "compute_rsa", "load_rsa", "read_rsa_record", "rsa_is_current"]
