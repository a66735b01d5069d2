"""Experiments that train, evaluate and report end to end: the demo (`spd demo`) and the
canonical-camera experiment (`make camera-experiment`)."""
