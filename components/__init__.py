"""kfp v2 components of the tsallis pipeline, one per stage: tsallis_kubeflow/components.py."""

from tsallis_kubeflow.components import STAGES, build

__all__ = ["STAGES", "build"]
