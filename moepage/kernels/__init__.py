"""Compute kernels. Imports nothing else from moepage."""
