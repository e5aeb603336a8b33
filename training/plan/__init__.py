"""`genesis plan`: fake-tensor traces of the training step, GPU profiles, the fit search (cli.py)."""
