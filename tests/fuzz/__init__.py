"""The malformed-request corpus of ``tests/test_service_fuzz.py``, one module per topic."""
