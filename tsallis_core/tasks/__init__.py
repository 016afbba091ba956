"""Tasks: prompt/answer records, answer extraction and verifiers."""
