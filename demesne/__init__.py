"""demesne: an OpenAI-compatible LLM inference server on llama.cpp for ordinary hardware."""

__version__ = "0.1.0"
