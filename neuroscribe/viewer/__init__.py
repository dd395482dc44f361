"""The local web viewer of a run."""
