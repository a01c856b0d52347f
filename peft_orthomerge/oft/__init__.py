"""OFT adapters: reading PEFT checkpoints, the merge plan, adapter / folded-model writers, public API."""
