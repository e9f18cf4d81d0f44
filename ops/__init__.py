"""Operator tools: ``orders-admin`` (queues, dead letters, orders) and the Redis ACL line.

They use the messaging core and, where they read orders, the order service's public
functions; never a consumer service's internals.
"""
