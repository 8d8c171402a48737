"""Models the raw core runs: the seed network and its data (:mod:`~bnraw.models.seed`), and the
same network as real Keras layers with state transfer both ways
(:mod:`~bnraw.models.keras_bridge`)."""
