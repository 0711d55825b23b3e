import os

# Quiet TensorFlow and keep each process on one thread: tests run two ranks on two cores.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "1")
