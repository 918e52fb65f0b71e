"""Training state <-> (safe tree, tensors): flattening, restoring, RNG streams, data position."""
