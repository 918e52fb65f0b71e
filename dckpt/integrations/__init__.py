"""Adapters that give training frameworks dckpt checkpoints, thin over manager and engine.
Each imports its framework only when used: `from dckpt.integrations.accelerate import
DckptAccelerator`. May import every layer below (tools, manager, engine, ...); never cli."""
