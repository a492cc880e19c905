"""FM-generated synthetic data: made by `generate`, used in runs by `mix`."""
