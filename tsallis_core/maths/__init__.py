"""The maths: the Tsallis losses, the estimator registry, q schedules, the gradient-flow theory, intervals. Pure functions of tensors and numbers; imports nothing else of the library."""
