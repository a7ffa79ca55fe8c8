"""Sub-commands of the nanodiffusion command line."""
