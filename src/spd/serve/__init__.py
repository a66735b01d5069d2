"""`spd serve`: an HTTP service around a predictor (`app`), its encoded-image cache (`cache`), the
click-for-depth page (`page.html`) and a load check (`loadcheck`). Needs the optional extra:
pip install "spd[serve]"."""
