"""bgpool's reliability and security suite: faults, load and bad input."""
