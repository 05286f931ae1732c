"""OpenAI-compatible HTTP server over one engine: protocol models, routes, SSE streaming, metrics."""
