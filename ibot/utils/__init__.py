"""Run-level utilities: distributed set-up and collectives, metric logging, checkpoint I/O, seeding."""
