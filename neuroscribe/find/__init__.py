"""FIND-style interpretability agents and FIND's own benchmark format."""
