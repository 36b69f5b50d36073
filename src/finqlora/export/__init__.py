"""Sharing the model: adapter zip with checksums, merged safetensors, GGUF with an Ollama
Modelfile."""
