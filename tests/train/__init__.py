"""A package, so test modules here may share a basename with another folder's (test_preference.py)."""
