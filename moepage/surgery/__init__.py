"""Offline tools: split, verify, profile, extract, upcycle, train, export."""
