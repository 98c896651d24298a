"""Fine-tuning: the training recipe (`train`; sharded over Ray Train: `distributed`), checkpoints and
their names (`adapters`, `checkpoints`, `heap`) and what is kept of full fine-tunes (`retention`)."""
