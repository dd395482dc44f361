"""Sparse autoencoders: the model, its losses, training, evaluation, activation stores."""
