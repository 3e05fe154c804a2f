"""``python -m tqcodec`` runs the ``tqz`` command line."""
from .cli import main

main()
