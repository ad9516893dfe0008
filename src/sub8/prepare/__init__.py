from .graph import LayerInfo, capture
from .fold import fold_batchnorm
from .prepare import PreparedModel, prepare

__all__ = ["LayerInfo", "PreparedModel", "capture", "fold_batchnorm", "prepare"]
