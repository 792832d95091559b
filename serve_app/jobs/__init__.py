"""Async image jobs: durable records, leases that survive dead replicas, progress, cancel."""
