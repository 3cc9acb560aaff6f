"""`capray export`: a trained checkpoint as a TensorFlow SavedModel that needs no capray to run.

Its `serving_default` signature takes a batch of encoded images (JPEG, PNG, GIF, BMP as
`tf.string`) and returns `caption` (string), `log_prob` (float32) and `num_tokens` (int32, `<end>`
included) per image. Decoding, resizing, InceptionV3's preprocessing, the backbone and greedy
decoding all run inside the graph, so `tf.saved_model.load(path).signatures["serving_default"]`
and TF Serving caption raw image bytes.

What differs from capray's own decoding (capray.images), so captions can differ for some images:
  - the resize is TensorFlow's bilinear with antialiasing, PIL's triangle filter in floating point:
    on 40 Flickr photos the pixels differ by 0.17 grey levels on average, 1 at most (JPEGs decode
    to identical pixels: both use libjpeg's accurate IDCT);
  - JPEGs of 598 px and more on both sides are decoded at full size (capray decodes them at 1/2,
    1/4 or 1/8 scale: ~0.7 grey levels apart after the resize, docs/performance.md);
  - EXIF orientation is not applied (tf.io.decode_image ignores it), and transparent pixels keep
    their hidden colour instead of white;
  - the model runs in float32 whatever `model.precision` the jobs used.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any

from capray.images import FEATURE_DIM, IMAGE_SIZE, NUM_CELLS

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """The export target exists (without --overwrite), or the checkpoint cannot be exported."""


def _pixels(data: Any) -> Any:
    """One encoded image (scalar string) -> (299, 299, 3) float32 in [0, 255], as uint8 values."""
    from capray.model import tf

    # libjpeg's accurate integer IDCT, as PIL uses: the same pixels as capray.images.decode
    # (TensorFlow's default, the fast IDCT, is up to 20 grey levels off).
    img = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8),
    )  # (H, W, 3)
    img.set_shape([None, None, 3])
    img = tf.image.resize(img, (IMAGE_SIZE, IMAGE_SIZE), method="bilinear", antialias=True)
    # PIL hands the model uint8 pixels: round the same way before preprocessing.
    return tf.round(tf.clip_by_value(img, 0.0, 255.0))


def build_serving_fn(backbone: Any, model: Any, tokenizer: Any, max_length: int = 0) -> Any:
    """The serving function: a batch of image bytes -> caption, log_prob, num_tokens (TF ops only)."""
    from capray.model import keras, tf

    steps = (max_length or tokenizer.max_length) - 1
    words = tf.constant(tokenizer.words)
    special = tf.constant([tokenizer.pad_id, tokenizer.start_id, tokenizer.end_id])

    def serve(images: Any) -> dict[str, Any]:
        pixels = tf.map_fn(_pixels, images, fn_output_signature=tf.TensorSpec((IMAGE_SIZE, IMAGE_SIZE, 3), tf.float32))
        x = keras.applications.inception_v3.preprocess_input(pixels)
        grid = backbone.inception(x, training=False)  # (B, 8, 8, 2048)
        features = tf.reshape(tf.cast(grid, tf.float32), (-1, NUM_CELLS, FEATURE_DIM))  # (B, 64, 2048)
        tokens, _, log_prob, lengths = model.greedy(
            features, steps, start_id=tokenizer.start_id, end_id=tokenizer.end_id
        )
        keep = tf.reduce_all(tokens[..., None] != special, axis=-1)  # (B, steps): the words only
        caption = tf.strings.reduce_join(tf.ragged.boolean_mask(tf.gather(words, tokens), keep), axis=1, separator=" ")
        return {"caption": caption, "log_prob": log_prob, "num_tokens": lengths}

    return serve


def check_output(output: str, storage_cfg: Any = None, overwrite: bool = False) -> bool:
    """Whether `output` exists; ExportError when it is empty, or exists and `overwrite` is off."""
    from capray import storage

    if not output:
        raise ExportError("output is empty: give the SavedModel's folder, e.g. output=exported/captioner")
    found = storage.exists(output, storage_cfg)
    if found and not overwrite:
        raise ExportError(f"{output} exists: choose another output, or pass --overwrite to replace it")
    # --overwrite deletes the folder: only an earlier export, never a work_dir or anyone's files.
    if found and not storage.exists(storage.join(output, "saved_model.pb"), storage_cfg):
        raise ExportError(
            f"{output} exists and is no SavedModel (no saved_model.pb): --overwrite replaces an earlier export "
            "only; choose another output"
        )
    return found


def export(
    checkpoint_uri: str, output: str, storage_cfg: Any = None, max_length: int = 0, overwrite: bool = False
) -> str:
    """Write the checkpoint's model, with its backbone and decoding, as a SavedModel in `output`."""
    from capray import checkpoint, storage
    from capray.model import Backbone, keras, set_precision, tf  # TensorFlow only once exporting

    if check_output(output, storage_cfg, overwrite):
        fs, path = storage.filesystem(output, storage_cfg)
        fs.delete_dir(path)
    set_precision("float32")  # what Serving runs on any device; the exported graph is fixed
    model, tokenizer, train_cfg, _ = checkpoint.load(checkpoint_uri, storage_cfg)
    # The backbone the training features came from.
    backbone = Backbone(train_cfg.backbone.weights, train_cfg.backbone.seed, storage_cfg)
    archive = keras.export.ExportArchive()
    archive.track(backbone.inception)
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        build_serving_fn(backbone, model, tokenizer, max_length),
        input_signature=[tf.TensorSpec([None], tf.string, name="images")],
    )
    local = output
    with tempfile.TemporaryDirectory(prefix="capray-export-") as tmp:
        if storage.is_remote(output):
            local = os.path.join(tmp, "model")
        archive.write_out(local, verbose=False)
        if storage.is_remote(output):
            storage.upload_dir(local, output, storage_cfg)
    return output


def run(cfg: Config) -> dict[str, Any]:
    """`capray export CONFIG [checkpoint=...] output=DIR`: the best (or given) checkpoint as a SavedModel."""
    from capray.checkpoint import best_checkpoint

    uri = best_checkpoint(cfg)
    out = export(uri, cfg.output, cfg.storage, cfg.caption.max_length, overwrite=cfg.export.overwrite)
    log.info(
        "export: %s -> %s (SavedModel; signature serving_default: images (string) -> caption, log_prob, num_tokens)",
        uri,
        out,
    )
    return {"checkpoint": uri, "output": out}
