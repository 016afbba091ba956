"""Rollouts: sampling completions from a policy (the eager KV-cache loop and the static-cache loop with CUDA graphs) and their log-probs."""
