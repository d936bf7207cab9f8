"""Training objectives: the alignment terms between the intact and the corrupted path (registry:
``OBJECTIVES``), their contract (``units`` included), the outputs they read, the cross-entropy and
the weight schedules (registry: ``WEIGHTS``)."""
