"""Fault scenarios against the real stack and the scoreboard they print (``make chaos``)."""
