"""Backbones: the multimodal models crystalkit trains, behind one interface."""

from crystalkit.models.backbone import Backbone, BackboneOutput

__all__ = ["Backbone", "BackboneOutput"]
