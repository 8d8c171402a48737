import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests run on the CPU even where a GPU is present: tolerances and modes are set for it.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# --mode=auto's cache of measured choices (bnraw.machine): off, so every test measures afresh
# and nothing is written outside the test's own folders.
os.environ.setdefault("BNRAW_CACHE_DIR", "off")
