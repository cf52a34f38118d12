"""Held-out metrics: retrieval recall with ITM re-ranking, query diversity."""
