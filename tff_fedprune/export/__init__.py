"""Export of trained models for phones (`tflite`)."""
