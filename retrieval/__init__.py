"""Retrieval: FAISS index building, search and evaluation."""
