"""dspark-trt: DSpark speculative decoding on TensorRT and Triton Inference Server.

The repository's top-level folders are mapped under this namespace:
``builder/`` is ``dspark_trt.builder``, ``runtime/`` is ``dspark_trt.runtime``,
``plugins/`` is ``dspark_trt.plugins`` and ``client/`` is ``dspark_trt.client``.
"""

__version__ = "0.1.0"
