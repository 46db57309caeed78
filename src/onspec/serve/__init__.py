"""`onspec serve`: an OpenAI-compatible HTTP server over the speculative engine, with the online
trainer learning from the served traffic, Prometheus metrics and a live dashboard."""
