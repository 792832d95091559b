"""OpenAI-compatible chat and text completions served by the LLM deployments."""
