"""Score explanations: correlation of simulated and true activations, detection and fuzzing."""
