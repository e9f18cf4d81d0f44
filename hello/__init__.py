"""The original Hello publisher: "Hello from Python #N" every two seconds.

It depends only on the messaging core (no SQLAlchemy, no Flask), so it starts as fast
as the tutorial's original ``publisher.py``.
"""
