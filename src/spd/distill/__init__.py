"""Distillation (DESIGN.md §12): a dense teacher's depth maps on your unlabelled images become an
ordinary dataset description, and `spd train` makes a sparse student of it.

    spd distill label --images photos/ --teacher depth-anything-metric-folder/ --out labels/
    spd train --config v15_tiny_synth --data-root labels/labels.yaml --out runs/student

- `teachers.py`: what a teacher is (RGB images -> metric depth maps at their size) and the kinds
  loaded: a `transformers` depth-estimation folder, an SPD model folder, the DAv2-S baseline.
- `align.py`: a relative (affine-invariant) teacher made metric per image by least squares against
  sparse metric points, in the space the teacher predicts in.
- `images.py`: the unlabelled images (a folder or a list), checked before any work.
- `label.py`: the resumable, sharded, atomically written labelling job and its manifest.
"""
