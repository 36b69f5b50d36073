"""The shared base every stage builds on: errors, paths, atomic file I/O, the run config,
version sets, the chat format and text normalisation. Imports nothing else from finqlora."""
