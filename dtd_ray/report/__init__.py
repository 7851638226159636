from dtd_ray.report.build import *  # noqa: F401,F403  (temporary during the restructure)
from dtd_ray.report.build import class_activation_maps, depth_of, findings, last_block_maps, model_table, trend  # noqa: F401
