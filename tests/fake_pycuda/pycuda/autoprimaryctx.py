"""Fake of pycuda.autoprimaryctx: 'retains' device 0."""
from . import driver as _driver

_driver.init()
device = _driver.Device(0)
context = device.retain_primary_context()
