"""Observability of a mounted device: read counters, latency histogram, slow-read
watchdog, the per-handler stats socket (``obd stats``) and Prometheus endpoint."""
