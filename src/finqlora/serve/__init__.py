"""Using the model: the OpenAI-compatible server over one base with several adapters."""
