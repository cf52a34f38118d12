"""The models: frozen image encoders, the Q-Former and its masks, the two BLIP-2 stages, their losses, the frozen LLM and tokenizer, and the factory that builds them and loads their weights."""
