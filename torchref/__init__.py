"""torchref: the PyTorch mirror of jaxnets. Same module names, same class names, same layer
names; it is the reference the JAX side is checked against."""
