"""Generation: LLM engines (transformers, vLLM, OpenAI-compatible HTTP), the Ray Data generation
step every stage calls, and parsing of what the models write."""
