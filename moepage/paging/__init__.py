"""Where expert bytes come from (sources) and how long they stay (cache, prefetch, secretary)."""
