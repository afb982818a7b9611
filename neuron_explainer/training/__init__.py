"""Training on a model's activations: sparse autoencoders (`training.autoencoders`)."""
