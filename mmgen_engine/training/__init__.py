"""Plain PyTorch implementations of the architectures the engine defines itself (a2g-gpt): what
their models are trained with, and the source format their converters read."""
