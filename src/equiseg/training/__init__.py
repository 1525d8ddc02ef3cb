"""Training: the loss, the Lightning module, and the fit loop."""
