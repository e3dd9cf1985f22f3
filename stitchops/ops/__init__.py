"""Public functional ops: checks, torch.library registration, backend dispatch, autograd."""
