"""One client for every LLM: llama.cpp, OpenAI-compatible servers, Anthropic, transformers."""
