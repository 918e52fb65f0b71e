"""Ranks and what they agree on: rank/world and the collective exchanges with their shared
failure (collective), who writes which tensor block (sharding), partitioned optimizer state
such as ZeRO (partitioned). Everything is a no-op when torch.distributed is not initialized.

May import state, storage, format and errors; never engine or anything above it.
"""
