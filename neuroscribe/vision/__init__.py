"""Vision: a CNN's first-layer channels in words."""
