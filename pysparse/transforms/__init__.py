"""Whole-model rewrites, above the layers they put in (transforms -> nn -> ops -> formats).

* :mod:`.sparsify`: swap block-sparse nn.Linear / nn.Conv2d for pysparse layers, phase by phase (``pysparse.sparsify``);
  its report classes are in :mod:`.report`.
* :mod:`.fold_batchnorm`: fold BatchNorms into the conv / linear before them (``pysparse.fold_batchnorm``).
* :mod:`.activation_fusion`: find activations a swapped layer can apply itself (module swapping).
* :mod:`.forward_fusion`: rewrite blocks' forward with torch.fx to fuse residual adds and activations.
* :mod:`.attention_switch`: run a transformers model's attention in pysparse's CPU kernel.
* :mod:`.gelu_switch`: run a model's exact-GELU modules in pysparse's GELU for a while (``distill``).

The functions are not re-exported here: ``pysparse.transforms.sparsify`` stays the module (``pysparse.sparsify`` is
the function).
"""
