"""The kfp components, kept in tsallis_kubeflow/components.py (re-exported here for scripts that import
``components.stages``)."""

from tsallis_kubeflow.components import *
from tsallis_kubeflow.components import STAGES, build  # noqa: F401
