// Library module holding FedDpClassifier; add it to an Android app project
// (settings.gradle.kts: include(":android")). Not built by this repository's CI:
// the check here is that exported models use only builtin ops and run in the
// TFLite and LiteRT Python interpreters (tests/export_tflite_test.py).
plugins {
  id("com.android.library")
  kotlin("android")
}

android {
  namespace = "org.tffprune.sample"
  compileSdk = 34
  defaultConfig { minSdk = 24 }
  sourceSets["main"].java.srcDirs("src/main/kotlin")
}

dependencies {
  // LiteRT, the TFLite runtime's current name (same org.tensorflow.lite API);
  // org.tensorflow:tensorflow-lite:2.14.0 works as well.
  implementation("com.google.ai.edge.litert:litert:1.0.1")
}
