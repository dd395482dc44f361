"""Explain a unit in one sentence: the no-LLM baseline and OpenAI's LLM explainers."""
