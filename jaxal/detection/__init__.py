"""Object detection: box datasets live in `jaxal.data.boxes`; here the detector's evaluation (and its
model, targets, losses and decoding)."""
