"""Simulated training sets; ``onthefly``: simulations drawn inside the training loop."""
