package org.tffprune.sample

import android.graphics.Bitmap
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import org.tensorflow.lite.Interpreter

/**
 * Runs a model written by `python -m experiments.export_tflite` on a phone.
 *
 * The file has one signature, `serving_default`: input `images`, float32
 * [1, H, W, C] raw pixel values on the training data's scale (0..255 for
 * Fashion-MNIST and CIFAR; normalisation is inside the model); output
 * `logits`, float32 [1, classes]. Only TFLite builtin ops are used, so the
 * stock runtime (org.tensorflow:tensorflow-lite or LiteRT) runs it.
 *
 * Which file to ship: to a phone, the static export (`--mode=static`) made
 * for that device (its keep ratio, calibrated on its own training data):
 * every convolution has constant filters, which LiteRT's default XNNPACK
 * delegate runs, and it is smaller and faster than the dense file. The
 * dynamic export (per-input top-k) runs its gated convolutions outside
 * XNNPACK and was slower than the dense file in every measurement (README,
 * "On phones"); the dense file is the baseline. All three take the same
 * input and give the same output, so the app code does not change.
 */
class FedDpClassifier(modelFile: File, numThreads: Int = 1) : AutoCloseable {
  private val interpreter =
      Interpreter(modelFile, Interpreter.Options().setNumThreads(numThreads))
  private val inputShape: IntArray =
      interpreter.getInputTensorFromSignature(INPUT, SIGNATURE).shape()
  private val numClasses: Int =
      interpreter.getOutputTensorFromSignature(OUTPUT, SIGNATURE).shape()[1]

  val height: Int get() = inputShape[1]
  val width: Int get() = inputShape[2]
  val channels: Int get() = inputShape[3]

  /** Logits for one image given as H * W * C floats in NHWC order. */
  fun logits(pixels: FloatArray): FloatArray {
    require(pixels.size == height * width * channels) {
      "expected ${height * width * channels} values, got ${pixels.size}"
    }
    val input = ByteBuffer.allocateDirect(4 * pixels.size).order(ByteOrder.nativeOrder())
    input.asFloatBuffer().put(pixels)
    val output = ByteBuffer.allocateDirect(4 * numClasses).order(ByteOrder.nativeOrder())
    interpreter.runSignature(mapOf(INPUT to input), mapOf(OUTPUT to output), SIGNATURE)
    output.rewind()
    return FloatArray(numClasses).also { output.asFloatBuffer().get(it) }
  }

  /** The most likely class of a bitmap, resized to the model's input. */
  fun classify(bitmap: Bitmap): Int {
    val scaled = Bitmap.createScaledBitmap(bitmap, width, height, true)
    val argb = IntArray(width * height)
    scaled.getPixels(argb, 0, width, 0, 0, width, height)
    val pixels = FloatArray(width * height * channels)
    for ((i, p) in argb.withIndex()) {
      val r = (p shr 16 and 0xFF).toFloat()
      val g = (p shr 8 and 0xFF).toFloat()
      val b = (p and 0xFF).toFloat()
      if (channels == 1) {
        // Fashion-MNIST: white garment on black, as in the dataset.
        pixels[i] = 255f - (r + g + b) / 3f
      } else {
        pixels[3 * i] = r
        pixels[3 * i + 1] = g
        pixels[3 * i + 2] = b
      }
    }
    return logits(pixels).withIndex().maxByOrNull { it.value }!!.index
  }

  override fun close() = interpreter.close()

  companion object {
    const val SIGNATURE = "serving_default"
    const val INPUT = "images"
    const val OUTPUT = "logits"
  }
}
