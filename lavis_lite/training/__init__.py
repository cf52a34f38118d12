"""The one training loop, its config and its loss-curve plot."""
