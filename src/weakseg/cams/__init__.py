"""CAM methods (a plain dict registry) and the CAM-generation stage."""

from weakseg.cams.base import CamMethod
from weakseg.cams.methods import METHODS, build_cam_method, required_model

__all__ = ["METHODS", "CamMethod", "build_cam_method", "required_model"]
