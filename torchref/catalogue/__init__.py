"""The bug catalogue: classic PyTorch -> Flax porting bugs, each planted in a correct port and
run through the verify engine, to measure what the engine catches (``docs/catalogue.md``)."""
