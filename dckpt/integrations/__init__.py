"""Adapters that give training frameworks dckpt checkpoints. Each imports its framework
only when used: `from dckpt.integrations.accelerate import DckptAccelerator`."""
