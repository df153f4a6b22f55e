"""The method-agnostic adapter core: the layer base, injection, AdaptedModel, the method contract and
registry, persistence, and weighted combination. Nothing here imports a specific method."""
