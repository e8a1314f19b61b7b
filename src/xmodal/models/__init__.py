"""Models built from xmodal's blocks: the Sort-of-CLEVR VQA model (``xmodal.models.vqa``)."""

from xmodal.models.vqa import VQAConfig, VQAModel

__all__ = ["VQAConfig", "VQAModel"]
