"""Object detection: target assignment, losses, decoding of FCOS."""
