"""NYU Depth V2's Kinect RGB camera: the canonical camera a model predicts for unless its config
names another (`spd.cameras.canonical`), and the camera of NYU-layout data (`spd.data`)."""

NYU_FOCAL = 518.8579  # pixels, fx at 640x480
NYU_INTRINSICS = (518.8579, 519.4696, 325.5824, 253.7362)  # fx, fy, cx, cy in pixels at 640x480
