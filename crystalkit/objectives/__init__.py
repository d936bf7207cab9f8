"""Alignment objectives between the intact and the corrupted path (registry: ``OBJECTIVES``)."""
