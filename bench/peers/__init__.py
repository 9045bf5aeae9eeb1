"""The peers ``make bench`` runs the gateway's workload on: Procrastinate and a SKIP LOCKED outbox."""
