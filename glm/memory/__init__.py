"""Memory: how much a run needs before it allocates any, and how much it used.

  shapes.py    a model's shape, from its config.json or built in for THUDM's releases
  estimate.py  the bytes of each part of a training step or a decoding batch, per device
  plan.py      a run's phases, whether they fit, the cheapest changes that make them fit
  measure.py   what a run used (peak resident memory, Paddle's allocator) and what is available
"""
