"""One checkpoint: save, load, plan, commit, incremental bases.

Owns the path of one `dckpt.save` / `dckpt.load` (checkpoint), the atomic directory commit
(commit), base reuse and consolidation of incremental checkpoints (incremental) and the GC
pause around a call (gcpause). May import distributed, state, storage, format and errors;
never manager, tools, integrations or cli.
"""
