"""I/O: reading adapters and checkpoints lazily, writing outputs atomically. Knows nothing of merging."""
