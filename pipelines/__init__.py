"""The Kubeflow pipelines of the project (cold_start_sweep.py)."""
