"""Training: the trainer's recipes, optimiser engines, checkpoints, model loading."""
