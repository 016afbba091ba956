"""kfp v2 components of the tsallis pipeline, one per stage (see stages.py)."""

from .stages import STAGES, build

__all__ = ["STAGES", "build"]
