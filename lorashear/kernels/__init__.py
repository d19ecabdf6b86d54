"""Numeric kernels of lorashear: the LHSPG half-space group projection and group norms.

The public surface is small: describe each weight with :class:`GroupedWeight`, then call
:func:`project_groups` (one LHSPG step, in place; :class:`ProjectionPlan` prepares the same
groups once for many steps) or :func:`group_norms` (saliency). Both pick the
fused Triton kernels on CUDA and the torch reference elsewhere; Triton is optional.
"""

from lorashear.kernels.group_projection import (
    Backend,
    ProjectionPlan,
    group_norms,
    group_sq_norms,
    project_groups,
    select_backend,
    triton_available,
)
from lorashear.kernels.grouped_weight import NO_GROUP, GroupedWeight, GroupProjectionStats

__all__ = [
    "NO_GROUP",
    "Backend",
    "GroupProjectionStats",
    "GroupedWeight",
    "ProjectionPlan",
    "group_norms",
    "group_sq_norms",
    "project_groups",
    "select_backend",
    "triton_available",
]
