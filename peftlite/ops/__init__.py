"""Low-rank update kernels: the reference definition and the fast paths held to it."""
