"""Test-wide setup: tests/ on sys.path for the shared test support (tests/harness/)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
