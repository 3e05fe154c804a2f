"""tqcodec: transform-quantization codec and the .tqz container for neural-network weights.

    import tqcodec
    tqcodec.save(model.state_dict(), "model.tqz")
    state = tqcodec.load("model.tqz")
    with tqcodec.open("model.tqz") as f:
        w = f.get_tensor("fc1.weight")
"""
__version__ = "0.1.0"
FORMAT_VERSION = (1, 1)

from .errors import TqzError  # noqa: E402
from .limits import Limits  # noqa: E402
from .api import (EncodeOptions, TensorInfo, TqzFile, VerifyReport, encode_bytes,  # noqa: E402
                  iter_tensors, load, open, save, verify)
from .calibrate import Stats, calibrate  # noqa: E402
from .nn import load_module  # noqa: E402
from .finetune import finetune  # noqa: E402

__all__ = ["TqzError", "Limits", "EncodeOptions", "TensorInfo", "TqzFile", "VerifyReport",
           "encode_bytes", "iter_tensors", "load", "open", "save", "verify", "__version__",
           "FORMAT_VERSION", "Stats", "calibrate", "load_module", "finetune"]
