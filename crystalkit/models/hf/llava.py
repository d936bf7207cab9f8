"""LLaVA-style models (placeholder; filled in below)."""
