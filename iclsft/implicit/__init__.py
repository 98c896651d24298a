"""The implicit-pattern suite (SPEC §8): its specs and conditions (`spec`), items and prompts (`data`),
scoring and metrics (`evaluate`, `results`) and the circuit-shift analysis (`circuits`)."""
