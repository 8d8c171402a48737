"""The step trace: the store (``trace.npz``, :class:`~bnraw.tracing.store.Trace`), its
TensorBoard view, and the step debugger that stops inside one BN layer's moving update."""
