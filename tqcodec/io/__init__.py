"""Files: model files in and out (``.pt``, ``.safetensors``, Hugging Face folders), the sources a
``.tqz`` file is read from (a path, bytes, a file object, a URL), and atomic outputs."""
