"""Downstream services: payment, invoice and email workers on reliable Redis queues."""
