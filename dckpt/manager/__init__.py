"""Numbered checkpoints under a root: commit, retention, resume."""
from .manager import CheckpointManager, ResumeReport
from .retention import Retention

__all__ = ["CheckpointManager", "ResumeReport", "Retention"]
