"""CAM methods (a plain dict registry) and the CAM-generation stage."""

from weakseg.cams.methods import METHODS, CamMethod, build_cam_method

__all__ = ["METHODS", "CamMethod", "build_cam_method"]
