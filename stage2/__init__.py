"""Stage 2: the Q-Former bridged to a frozen LLM (captioning, VQA)."""
