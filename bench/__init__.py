"""Load generator and benchmark for STOMP over WebSocket (``python -m bench`` / ``make bench``).

See bench/RESULTS.md for how to run it and the latest figures.
"""
