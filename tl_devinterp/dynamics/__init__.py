"""Dynamics: the geometry of training trajectories (essential dynamics), stages from the LLC curve, and heads
clustered by their trajectories."""

from .essential import EDResult, essential_dynamics, essential_dynamics_of_features, gaussian_smooth
from .geometry import OsculatingCircles, evolute_cusps, osculating_circles
from .stages import Stage, find_stages, stages_frame
from .trajectories import HeadClusters, cluster_heads

__all__ = [
    "EDResult", "essential_dynamics", "essential_dynamics_of_features", "gaussian_smooth",
    "OsculatingCircles", "evolute_cusps", "osculating_circles", "Stage", "find_stages", "stages_frame",
    "HeadClusters", "cluster_heads",
]
