"""capray: distributed batch image captioning (Show, Attend and Tell) on Ray.

Keras choice, made once here: Keras 3 on the TensorFlow backend (what `tf.keras` is since TF 2.16).
`tf_keras` is the frozen Keras 2 kept for old code; Keras 3 layers and optimizers work inside
`tf.distribute` custom loops (MultiWorkerMirroredStrategy) and `tf.function`, which is all the
training and inference code needs, and it is the line that receives fixes.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
