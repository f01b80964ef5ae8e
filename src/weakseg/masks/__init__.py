"""Pseudo-mask makers (a plain dict registry) and the `masks` stage."""

from weakseg.masks.makers import MAKERS, MaskMaker, build_mask_maker

__all__ = ["MAKERS", "MaskMaker", "build_mask_maker"]
