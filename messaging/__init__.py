"""The messaging core: what every process of the project shares, and nothing else.

The envelope and event catalogue, Redis key names, the Redis connection (retries, TLS,
cluster), the reliable queue and its worker runtime, the event publisher, logging and
the configuration primitives. It imports no service: the order service, the consumer
services, the Hello publisher and the operator tools all build on it, and meet each
other only through the events it carries.
"""
