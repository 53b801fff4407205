"""Layer 2, storage: the database, models, guarded transitions, the intake store, the transcript,
the queue, migrations and the readiness probes of the database and Redis."""
