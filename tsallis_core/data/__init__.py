"""Data: records on disk, the synthetic cold-start task, the reasoning datasets, answer verifiers."""
