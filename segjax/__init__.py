"""segjax: image segmentation networks, training, metrics and studies in JAX/Flax."""

from segjax import xla_cpu

xla_cpu.apply()  # before JAX's first computation: see segjax/xla_cpu.py
