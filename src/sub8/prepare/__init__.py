from .graph import LayerInfo, capture
from .fold import fold_batchnorm
from .prepare import (PreparedModel, QuantizedModel, lowest_bits, module_layers, prepare_traced, prepare_untraced,
                      wrap_layers)

__all__ = ["LayerInfo", "PreparedModel", "QuantizedModel", "capture", "fold_batchnorm", "lowest_bits",
           "module_layers", "prepare_traced", "prepare_untraced", "wrap_layers"]
