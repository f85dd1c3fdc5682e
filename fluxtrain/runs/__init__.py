"""Run records, the queue and executor, launching the trainer, status, logs and cancel."""
