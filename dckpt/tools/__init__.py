"""Read-side and repair tools over finished checkpoints: verify, repair, diff, convert, and
export to the Hugging Face Hub layout.

Each returns a report object that the cli renders. May import manager, engine, distributed,
state, storage, format and errors; never integrations or cli.
"""
