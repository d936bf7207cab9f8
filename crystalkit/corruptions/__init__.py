"""Image corruptions for the corrupted path (registry: ``CORRUPTIONS``)."""
