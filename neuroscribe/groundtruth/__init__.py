"""Ground truth with known answers: OpenAI's puzzles, planted neurons, simulator checks."""
