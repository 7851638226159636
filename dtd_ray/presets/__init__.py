"""Named sweep configs (``<name>.yaml``), read by :func:`dtd_ray.ray.sweep.load_config`."""
