"""Tools that turn a checkpoint into something else (export to the Hub layout)."""
