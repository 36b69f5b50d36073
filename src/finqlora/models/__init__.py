"""Loading models and tokenizers (hub ids, local folders, GGUF files, the built-in offline
models), generation and the OpenAI-compatible API client."""
