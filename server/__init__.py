"""drllm's HTTP server: OpenAI-compatible completions over the routed executor."""
