"""moepage: serve Mixture-of-Experts LLMs larger than memory by paging routed experts from disk."""

__version__ = "0.1.0"
