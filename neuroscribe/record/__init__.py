"""Record what units respond to: neurons and SAE latents, top, quantile and random exemplars."""
