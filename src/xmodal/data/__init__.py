"""Data sets for xmodal's real tasks: Sort-of-CLEVR (``xmodal.data.sort_of_clevr``)."""

from xmodal.data.sort_of_clevr import ANSWERS, SortOfClevr, generate

__all__ = ["ANSWERS", "SortOfClevr", "generate"]
