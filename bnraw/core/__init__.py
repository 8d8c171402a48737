"""The maths and the state: pure ops, raw layers, the graph model, optimizers, the compiled step
and the loop. Imports TensorFlow, numpy and the standard library only: no Keras, no flags, no
file I/O."""
