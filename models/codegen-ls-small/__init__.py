"""The embedded default model (int8 ONNX + tokenizer + manifest), installed as package data."""
