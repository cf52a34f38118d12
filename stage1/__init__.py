"""Stage 1: Q-Former representation learning against a frozen image encoder."""
