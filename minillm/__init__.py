"""minillm: a small, readable LLM inference engine, built from scratch for a course."""
