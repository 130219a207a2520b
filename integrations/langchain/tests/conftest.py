import os

# Keep the engine's threads modest on shared CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")
