"""bgpool's reliability and security suite (issue 7): faults, load and bad input."""
