"""The environment of a test's subprocess with several CPU devices."""
import os


def with_devices(count: int) -> str:
  """The suite's XLA_FLAGS (tests/conftest.py) plus ``count`` CPU devices."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
