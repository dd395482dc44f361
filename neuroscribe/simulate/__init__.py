"""Simulate a unit's activations from its explanation alone."""
