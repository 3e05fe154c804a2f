"""Working with a torch model: calibration statistics that steer the encoder (``calibrate``),
fine-tuning on a file's own grid (``finetune``), and layers that run from the compressed form
(``nn``: transform-domain inference, ``load_module``)."""
