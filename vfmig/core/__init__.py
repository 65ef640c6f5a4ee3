"""Pure core of vfmig: no trio, no textual, no fds, no clock (see tests/test_import_hygiene.py)."""
