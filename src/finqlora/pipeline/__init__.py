"""The whole run: an engine that runs a given list of fingerprinted stages, and the stage list
of finqlora run."""
