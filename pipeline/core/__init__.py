"""The engine itself: declaring workflows, the tables and their only writer, claiming and
running attempts, retries, fan-out, recovery and operations. It imports no backend, no LLM
gateway and no operator surface; they build on it."""
