"""nbody-dt: learned integration timesteps for gravitational N-body systems."""

__version__ = "0.1.0"
