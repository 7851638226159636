from dtd_ray.ray.sweep.driver import *  # noqa: F401,F403  (temporary during the restructure)
from dtd_ray.ray.sweep.driver import trial_resources, finished_trial_ids, write_trial_row, dataclasses  # noqa: F401
