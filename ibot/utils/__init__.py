"""Run-level utilities: distributed set-up and collectives (and ``unwrap``), autocast precision, metric
logging, checkpoint I/O, seeding."""
