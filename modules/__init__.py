"""Network parts: normalisation layers (ABN family) and the DeepLabV3 ASPP head."""
from .deeplab import DeeplabV3  # noqa: F401
from .norm import (  # noqa: F401
    ABN,
    BatchNormAct,
    InPlaceABN,
    InPlaceABNSync,
    UnknownNormError,
    freeze_norm_layers,
    is_norm_layer,
    make_norm_act,
)
