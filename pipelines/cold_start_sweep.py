"""The cold-start sweep pipeline, kept in tsallis_kubeflow/cold_start_sweep.py (re-exported here)."""

from tsallis_kubeflow.cold_start_sweep import *
from tsallis_kubeflow.cold_start_sweep import (  # noqa: F401
    PIPELINE_NAME,
    build_pipeline,
    check_params,
    compile_pipeline,
    local_settings,
    run_local,
    submit,
)
