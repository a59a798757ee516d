"""The plugin contract: hookspecs, component bases, the registry, composition, the
training context, the rollout record and scoring, gradient updaters, the SFT loop, masked ops."""
