"""The lowest floor: errors, units, repository paths, processes and the content-addressed cache. Imports nothing else of moescope."""

__version__ = "0.1.0"
