"""neuroscribe: turn the units of a neural network into words and measure how true they are."""

__version__ = "0.1.0"
