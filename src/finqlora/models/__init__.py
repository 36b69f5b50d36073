"""Loading models and tokenizers (hub ids, local folders, GGUF files, the built-in offline
models), generation, the OpenAI-compatible API client and the environment doctor."""
