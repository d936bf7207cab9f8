"""Adapters that drive unmodified Hugging Face VLM classes through the :class:`Backbone` interface."""
