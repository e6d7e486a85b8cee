"""Pre-training: flags, the iBOT loss, the training step, optimisation, schedules, faults, the driver."""
