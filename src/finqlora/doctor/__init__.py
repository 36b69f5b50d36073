"""`finqlora doctor`: whether this machine can train and serve (Python, torch, GPU, bitsandbytes,
triton, the libraries, disk, the hub, the built-in models), and what to run when it cannot.

It checks the whole environment, not models, so it is a package of its own; it sits above
`models/` because it reports which built-in models are installed."""
