"""Every test runs on 8 fake CPU devices, with TensorFlow kept off any GPU."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
  # transformers' models import torch._dynamo, which imports triton (in torch's CUDA builds);
  # triton imported after TensorFlow segfaults (triton 3.8, tensorflow-cpu 2.21), so the
  # parity tests that build transformers models need it loaded first.
  import torch._dynamo  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass
import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top

tf.config.set_visible_devices([], "GPU")
assert jax.device_count() == 8, jax.devices()
