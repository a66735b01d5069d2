"""Cameras: the canonical-camera rule that makes depth metric for any lens (`canonical`) and
reading intrinsics given as numbers or files (`intrinsics`)."""
