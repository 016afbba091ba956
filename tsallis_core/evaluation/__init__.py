"""Evaluation: pass@k, maj@k, accuracy, EM/F1 of a trained model; the cold-start diagnosis."""
