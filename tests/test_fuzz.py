"""Not a test module: ``benchmarks/fuzz.py`` imports the fuzz harness as ``tests.test_fuzz``.

The harness is ``tests/fuzzing.py`` and its tests are ``tests/format/test_reader_hostile.py``;
``tests/conftest.py`` keeps pytest from collecting this file.
"""
from tests.fuzzing import *  # noqa: F401,F403
from tests.fuzzing import check_case, decode_load, decode_open, mutate, seed_files  # noqa: F401
