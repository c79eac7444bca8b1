"""Graph passes, one module each; the registry is filled in as passes land."""

PASSES: dict = {}
